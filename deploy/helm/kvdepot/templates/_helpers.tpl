{{- define "kvdepot.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvdepot.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvdepot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvdepot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvdepot.labels" -}}
{{ include "kvdepot.selectorLabels" . }}
app.kubernetes.io/component: cache-server
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
Memory for the pod: the arena (decimal GB, as the server counts it) plus headroom. The server
touches every page of the arena at start, so all of it is charged to this pod.
*/}}
{{- define "kvdepot.memory" -}}
{{- printf "%vG" (addf .Values.server.cpuBufferSizeGB .Values.server.memoryHeadroomGB) -}}
{{- end -}}

{{/*
Where the remote tier's TLS files are mounted: the flags name these paths.
*/}}
{{- define "kvdepot.remote.caFile" -}}/etc/kvdepot/remote-tls/ca/ca.crt{{- end -}}
{{- define "kvdepot.remote.certFile" -}}/etc/kvdepot/remote-tls/client/tls.crt{{- end -}}
{{- define "kvdepot.remote.keyFile" -}}/etc/kvdepot/remote-tls/client/tls.key{{- end -}}

{{/*
The remote tier's flags (docs/remote-tier.md). Values the server would refuse fail the render,
so a bad value never reaches a node as a crash loop.
*/}}
{{- define "kvdepot.remote.args" -}}
{{- $r := .Values.remote -}}
{{- if not $r.urls -}}
{{- fail "remote.enabled needs remote.urls: redis://HOST:PORT (rediss:// with remote.tls.enabled) of a cluster node" -}}
{{- end -}}
{{- if not (has $r.writePolicy (list "write-through" "on-evict" "off")) -}}
{{- fail (printf "remote.writePolicy %q: write-through, on-evict or off" $r.writePolicy) -}}
{{- end -}}
{{- if not (regexMatch "^[A-Za-z0-9_.:-]+$" (toString $r.keyPrefix)) -}}
{{- fail (printf "remote.keyPrefix %q: one or more of A-Z a-z 0-9 _ . : -" (toString $r.keyPrefix)) -}}
{{- end -}}
{{- if or (lt (int $r.ttlSeconds) 1) (lt (int $r.queueDepth) 1) (le (float64 $r.timeoutMs) 0.0) -}}
{{- fail "remote.ttlSeconds, remote.queueDepth and remote.timeoutMs must be positive" -}}
{{- end -}}
{{- range $r.urls }}
{{- $scheme := ternary "rediss://" "redis://" (not (not $r.tls.enabled)) }}
{{- if not (hasPrefix $scheme .) }}
{{- fail (printf "remote.urls: %q must start with %s (remote.tls.enabled is %v)" . $scheme $r.tls.enabled) }}
{{- end }}
- --remote
- {{ . | quote }}
{{- end }}
- --remote-ttl
- {{ $r.ttlSeconds | int | quote }}
- --remote-write-policy
- {{ $r.writePolicy | quote }}
- --remote-key-prefix
- {{ $r.keyPrefix | quote }}
- --remote-queue-depth
- {{ $r.queueDepth | int | quote }}
- --remote-timeout-ms
- {{ $r.timeoutMs | quote }}
{{- if $r.tls.enabled }}
{{- if $r.tls.caSecret }}
- --remote-ca-file
- {{ include "kvdepot.remote.caFile" . }}
{{- end }}
{{- if $r.tls.clientCertSecret }}
- --remote-cert-file
- {{ include "kvdepot.remote.certFile" . }}
- --remote-key-file
- {{ include "kvdepot.remote.keyFile" . }}
{{- end }}
{{- end }}
{{- end -}}
