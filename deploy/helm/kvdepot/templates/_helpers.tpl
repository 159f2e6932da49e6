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
