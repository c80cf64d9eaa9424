{{- define "payment-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "payment-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "payment-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "payment-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "payment-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "payment-worker.labels" -}}
helm.sh/chart: {{ include "payment-worker.chart" . }}
{{ include "payment-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "payment-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "payment-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the credentials: the existing one, or the one the chart renders. */}}
{{- define "payment-worker.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "payment-worker.fullname" . }}
{{- end }}
{{- end }}

{{/* Whether the chart renders a Secret. Fails on conflicting or missing secrets. */}}
{{- define "payment-worker.rendersSecret" -}}
{{- $s := .Values.secrets }}
{{- $inline := or $s.rabbitmqUri $s.stripeSecretKey $s.stripeWebhookKey }}
{{- if and $s.existingSecret $inline }}
{{- fail "secrets: set either secrets.existingSecret or the inline values (rabbitmqUri, stripeSecretKey, stripeWebhookKey), not both" }}
{{- end }}
{{- if and (eq .Values.mode "stripe") (not $s.existingSecret) (not (and $s.rabbitmqUri $s.stripeSecretKey)) }}
{{- fail "secrets: mode is stripe, so the worker needs RABBITMQ_URI and STRIPE_SECRET_KEY: set secrets.existingSecret (a Secret with those keys) or both secrets.rabbitmqUri and secrets.stripeSecretKey" }}
{{- end }}
{{- if $inline }}true{{ end }}
{{- end }}

{{/* The topology profile file mounted into the pod. */}}
{{- define "payment-worker.topology" -}}
{{- if .Values.topology.custom }}
{{- .Values.topology.custom }}
{{- else }}
{{- .Files.Get (printf "files/topology/%s.toml" .Values.topology.profile) }}
{{- end }}
{{- end }}

{{- define "payment-worker.durationSeconds" -}}
{{- $d := . | toString }}
{{- if hasSuffix "ms" $d }}{{ div (trimSuffix "ms" $d | atoi) 1000 }}
{{- else if hasSuffix "s" $d }}{{ trimSuffix "s" $d | atoi }}
{{- else if hasSuffix "m" $d }}{{ mul (trimSuffix "m" $d | atoi) 60 }}
{{- else }}{{ fail (printf "worker.shutdownGrace %q: write it in ms, s or m" $d) }}
{{- end }}
{{- end }}
