{{- define "fabmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- define "fabmesh.labels" -}}
app.kubernetes.io/name: fabmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "fabmesh.settings" -}}
{{- $s := deepCopy .Values.operator.settings -}}
{{- $_ := set $s "namespace" .Release.Namespace -}}
{{- range $key := list "agent_pods" "connector_pods" -}}
{{- $pods := default dict (get $s $key) -}}
{{- $_ := set $pods "image" (include "fabmesh.image" $) -}}
{{- $_ := set $pods "strongswan_image" (include "fabmesh.image" $) -}}
{{- $_ := set $pods "image_pull_policy" $.Values.image.pullPolicy -}}
{{- $_ := set $s $key $pods -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}

{{- /*
Cross-field rules values.schema.json cannot express; the operator would refuse these at start
(fabmesh/operator/settings.py), so say it at install time instead.
*/ -}}
{{- define "fabmesh.validate" -}}
{{- $le := .Values.operator.settings.leader_election -}}
{{- if not (and (gt (int $le.lease_duration_s) (int $le.renew_deadline_s))
                (gt (mul 10 (int $le.renew_deadline_s)) (mul 12 (int $le.retry_period_s)))) -}}
{{- fail (printf "operator.settings.leader_election: need lease_duration_s > renew_deadline_s > 1.2 * retry_period_s (got %v, %v, %v)" $le.lease_duration_s $le.renew_deadline_s $le.retry_period_s) -}}
{{- end -}}
{{- end -}}
