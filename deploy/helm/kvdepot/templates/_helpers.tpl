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

{{/*
Where the authentication files are mounted: the flags name these paths (docs/security.md).
*/}}
{{- define "kvdepot.auth.serverKeyFile" -}}/etc/kvdepot/server/server.key_secret{{- end -}}
{{- define "kvdepot.auth.allowedKeysDir" -}}/etc/kvdepot/allowed{{- end -}}
{{- define "kvdepot.auth.adminTokenFile" -}}/etc/kvdepot/admin/token{{- end -}}

{{/*
"true" when the admin API is on without a token, "" otherwise.
*/}}
{{- define "kvdepot.auth.openAdmin" -}}
{{- if and .Values.server.enableAdminApi (not .Values.auth.adminTokenSecret) }}true{{ end -}}
{{- end -}}

{{/*
The authentication flags. Combinations the server would refuse on the node's IP fail the
render, so they never reach a node as a crash loop.
*/}}
{{- define "kvdepot.auth.args" -}}
{{- $a := .Values.auth -}}
{{- if $a.curve.enabled -}}
{{- if not $a.curve.serverSecret -}}
{{- fail "auth.curve.enabled needs auth.curve.serverSecret: the Secret holding the server's secret certificate (NAME.key_secret from `kvdepot keys generate`; docs/security.md)" -}}
{{- end -}}
{{- if not $a.curve.allowedKeysSecret -}}
{{- fail "auth.curve.enabled needs auth.curve.allowedKeysSecret: the Secret whose keys are the allowed engines' public certificates (NAME.key; docs/security.md)" -}}
{{- end -}}
{{- else if not $a.allowUnauthenticated -}}
{{- fail "auth.allowUnauthenticated=false needs auth.curve.enabled=true (with auth.curve.serverSecret and auth.curve.allowedKeysSecret): the server refuses to serve the node's IP without CURVE (docs/security.md)" -}}
{{- end -}}
{{- if and $a.adminTokenSecret (not .Values.server.enableAdminApi) -}}
{{- fail "auth.adminTokenSecret is set but server.enableAdminApi is false: set server.enableAdminApi=true to serve the admin API with that token, or drop auth.adminTokenSecret" -}}
{{- end -}}
{{- if and (include "kvdepot.auth.openAdmin" .) (not $a.allowUnauthenticated) -}}
{{- fail "server.enableAdminApi needs auth.adminTokenSecret (a Secret with the bearer token POST /admin/* requires), or auth.allowUnauthenticated=true to leave the admin API open (docs/security.md)" -}}
{{- end -}}
{{- if and $a.tenants (not $a.curve.enabled) -}}
{{- fail "auth.tenants needs auth.curve.enabled=true: a client's CURVE key names its tenant (docs/security.md)" -}}
{{- end -}}
{{- if $a.curve.enabled }}
- --curve-secret-key
- {{ include "kvdepot.auth.serverKeyFile" . }}
- --curve-allowed-keys
- {{ include "kvdepot.auth.allowedKeysDir" . }}
{{- if $a.tenants }}
- --tenants
- /etc/kvdepot/tenants/tenants.yaml
{{- end }}
{{- end }}
{{- if $a.adminTokenSecret }}
- --admin-token-file
- {{ include "kvdepot.auth.adminTokenFile" . }}
{{- end }}
{{- if or (not $a.curve.enabled) (include "kvdepot.auth.openAdmin" .) }}
{{- if not $a.curve.enabled }}
# auth.allowUnauthenticated: the engines' port without CURVE, open to anyone who reaches it
# (it could look up and commit chunks of every engine's KV cache; docs/security.md)
{{- end }}
{{- if include "kvdepot.auth.openAdmin" . }}
# auth.allowUnauthenticated: the admin API without a token, open to anyone who reaches it
{{- end }}
- --allow-unauthenticated
{{- end }}
{{- end -}}
