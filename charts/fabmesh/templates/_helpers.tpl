{{- define "fabmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- define "fabmesh.labels" -}}
app.kubernetes.io/name: fabmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "fabmesh.settings" -}}
{{- $s := deepCopy .Values.operator.settings -}}
{{- $_ := set $s "namespace" .Release.Namespace -}}
{{- $pods := default dict $s.agent_pods -}}
{{- $_ := set $pods "image" (include "fabmesh.image" .) -}}
{{- $_ := set $pods "strongswan_image" (include "fabmesh.image" .) -}}
{{- $_ := set $pods "image_pull_policy" .Values.image.pullPolicy -}}
{{- $_ := set $s "agent_pods" $pods -}}
{{- toYaml $s -}}
{{- end -}}
