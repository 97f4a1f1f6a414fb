{{/*
Names, labels and small shared fragments of the site-node chart.
*/}}

{{/* The chart name (overridable with nameOverride). */}}
{{- define "site-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-qualified name every resource starts with (at most 63 characters). */}}
{{- define "site-node.fullname" -}}
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

{{/* name-version of the chart, for the helm.sh/chart label. */}}
{{- define "site-node.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Recommended labels on every resource. */}}
{{- define "site-node.labels" -}}
helm.sh/chart: {{ include "site-node.chart" . }}
{{ include "site-node.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: concord
{{- end }}

{{/* Labels that select this release's pods (add app.kubernetes.io/component). */}}
{{- define "site-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "site-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount pods run as. */}}
{{- define "site-node.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "site-node.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, or repository@digest when a digest is pinned. */}}
{{- define "site-node.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}
{{- end }}

{{/* Secret holding the site's private keys (always created by you, never by the chart). */}}
{{- define "site-node.keysSecretName" -}}
{{- required "siteKeys.existingSecret is required: create it from the output of site-node keys init" .Values.siteKeys.existingSecret }}
{{- end }}

{{/* Secret holding the OIDC client secret. */}}
{{- define "site-node.credentialsSecretName" -}}
{{- default (printf "%s-credentials" (include "site-node.fullname" .)) .Values.credentials.existingSecret }}
{{- end }}

{{/* Pod-level securityContext shared by every pod. */}}
{{- define "site-node.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level securityContext shared by every container. */}}
{{- define "site-node.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment every Flower process needs: no telemetry, no update check, no `uv sync`. */}}
{{- define "site-node.flowerEnv" -}}
- name: FLWR_TELEMETRY_ENABLED
  value: "0"
- name: FLWR_DISABLE_UPDATE_CHECK
  value: "1"
- name: FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
  value: "1"
- name: FLWR_HOME
  value: /tmp/flwr
- name: HOME
  value: /tmp
{{- end }}

{{/* Environment of both containers: the site settings (ConfigMap) and the client secret. */}}
{{- define "site-node.siteEnv" -}}
- name: CONCORD_SITE_CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "site-node.credentialsSecretName" . }}
      key: {{ .Values.credentials.existingSecretKey }}
{{- end }}

{{/* Mounts shared by the agent and the SuperNode. */}}
{{- define "site-node.volumeMounts" -}}
- name: state
  mountPath: /var/lib/concord/site
- name: keys
  mountPath: /var/lib/concord/site/keys
  readOnly: true
- name: hospital-data
  mountPath: {{ .Values.data.mountPath }}
  readOnly: true
- name: site-files
  mountPath: /etc/concord/site
  readOnly: true
- name: consortium-ca
  mountPath: /etc/concord/consortium-ca
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}
