{{/* The chart's name, or nameOverride; 63 characters at most (a DNS label). */}}
{{- define "payment-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of every object: fullnameOverride, or the release name, followed by the chart's name
unless the release name already contains it; 63 characters at most.
*/}}
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

{{/* The chart's name and version, for the helm.sh/chart label. */}}
{{- define "payment-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The labels that select the pods: name and instance only, since a Deployment's selector can never
change after it is created.
*/}}
{{- define "payment-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "payment-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The reconcile CronJob's pods: not the Deployment's selector labels, so the Service and the
PDB do not take them for workers. */}}
{{- define "payment-worker.reconcileSelectorLabels" -}}
app.kubernetes.io/name: {{ include "payment-worker.name" . }}-reconcile
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: reconcile
{{- end }}

{{/* The labels of every object: the selector labels plus chart, version and manager. */}}
{{- define "payment-worker.labels" -}}
{{ include "payment-worker.partOfLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{/* The same without the component, for the reconcile CronJob's objects, which name their own. */}}
{{- define "payment-worker.partOfLabels" -}}
helm.sh/chart: {{ include "payment-worker.chart" . }}
{{ include "payment-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ServiceAccount the pods run as: the chart's own, or the one named in values. */}}
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

{{/*
A duration written like the worker's settings (500ms, 20s, 2m) in whole seconds, for comparing
worker.shutdownGrace with terminationGracePeriodSeconds; fails on another unit.
*/}}
{{- define "payment-worker.durationSeconds" -}}
{{- $d := . | toString }}
{{- if hasSuffix "ms" $d }}{{ div (trimSuffix "ms" $d | atoi) 1000 }}
{{- else if hasSuffix "s" $d }}{{ trimSuffix "s" $d | atoi }}
{{- else if hasSuffix "m" $d }}{{ mul (trimSuffix "m" $d | atoi) 60 }}
{{- else }}{{ fail (printf "worker.shutdownGrace %q: write it in ms, s or m" $d) }}
{{- end }}
{{- end }}

{{/*
Whether the pods serve Stripe's webhook: the Ingress routes it to them, or a webhook key can
reach them (an inline key, or an existing Secret that may hold STRIPE_WEBHOOK_KEY). Non-empty
when they do; autoscaling never scales such pods to zero.
*/}}
{{- define "payment-worker.webhookServed" -}}
{{- if or .Values.ingress.enabled .Values.secrets.stripeWebhookKey .Values.secrets.existingSecret -}}
true
{{- end -}}
{{- end }}

{{/*
Whether an autoscaler owns the Deployment's replica count (then the Deployment states none).
*/}}
{{- define "payment-worker.autoscaled" -}}
{{- if or .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled -}}
true
{{- end -}}
{{- end }}

{{/* The secrets as environment variables, when they are not mounted as files. Takes
(dict "root" $ "webhook" BOOL): the webhook's signing key only for the worker. */}}
{{- define "payment-worker.secretEnv" -}}
{{- $root := .root }}
{{- $hasSecret := or $root.Values.secrets.existingSecret (include "payment-worker.rendersSecret" $root) }}
{{- if and $hasSecret (not $root.Values.secrets.asFiles) }}
- name: RABBITMQ_URI
  valueFrom:
    secretKeyRef:
      name: {{ include "payment-worker.secretName" $root }}
      key: RABBITMQ_URI
{{- if eq $root.Values.mode "stripe" }}
- name: STRIPE_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "payment-worker.secretName" $root }}
      key: STRIPE_SECRET_KEY
{{- end }}
{{- if .webhook }}
- name: STRIPE_WEBHOOK_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "payment-worker.secretName" $root }}
      key: STRIPE_WEBHOOK_KEY
      optional: true
{{- end }}
{{- end }}
{{- end }}

{{/* Whether the secrets are mounted as files. */}}
{{- define "payment-worker.secretFiles" -}}
{{- $hasSecret := or .Values.secrets.existingSecret (include "payment-worker.rendersSecret" .) }}
{{- if and $hasSecret .Values.secrets.asFiles }}true{{ end }}
{{- end }}

{{/* The topology, the broker's TLS files and the secret files, as the pods mount them. */}}
{{- define "payment-worker.volumeMounts" -}}
- name: topology
  mountPath: /etc/payment-worker
  readOnly: true
{{- if .Values.broker.tls.secretName }}
- name: broker-tls
  mountPath: /etc/payment-worker/tls
  readOnly: true
{{- end }}
{{- if include "payment-worker.secretFiles" . }}
- name: secrets
  mountPath: /var/run/secrets/payment-worker
  readOnly: true
{{- end }}
{{- end }}

{{/* The volumes behind payment-worker.volumeMounts. */}}
{{- define "payment-worker.volumes" -}}
- name: topology
  configMap:
    name: {{ include "payment-worker.fullname" . }}
    items:
      - key: topology.toml
        path: topology.toml
{{- with .Values.broker.tls.secretName }}
- name: broker-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- if include "payment-worker.secretFiles" . }}
- name: secrets
  secret:
    secretName: {{ include "payment-worker.secretName" . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* Where the worker and the reconcile pods may connect: the broker, Stripe, DNS. */}}
{{- define "payment-worker.egress" }}
    # The broker.
    - ports:
        - port: {{ .Values.networkPolicy.brokerPort }}
          protocol: TCP
      {{- with .Values.networkPolicy.brokerTo }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    # Stripe's API over HTTPS.
    - ports:
        - port: 443
          protocol: TCP
    # DNS.
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
{{- end }}
