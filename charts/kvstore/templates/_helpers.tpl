{{/* Labels of every object of the release. */}}
{{- define "kvstore.labels" -}}
app.kubernetes.io/part-of: kvstore
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of the operator pods. */}}
{{- define "kvstore.operatorSelector" -}}
app.kubernetes.io/name: kv-operator
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kvstore.serviceAccountName" -}}
{{- default "kv-operator" .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kvstore.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}
