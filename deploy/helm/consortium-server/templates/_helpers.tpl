{{/*
Names, labels and small shared fragments of the consortium-server chart.
*/}}

{{/* The chart name (overridable with nameOverride). */}}
{{- define "consortium-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-qualified name every resource starts with (at most 63 characters). */}}
{{- define "consortium-server.fullname" -}}
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

{{/* Name of the SuperLink's resources. */}}
{{- define "consortium-server.superlinkName" -}}
{{- printf "%s-superlink" (include "consortium-server.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* name-version of the chart, for the helm.sh/chart label. */}}
{{- define "consortium-server.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Recommended labels on every resource. */}}
{{- define "consortium-server.labels" -}}
helm.sh/chart: {{ include "consortium-server.chart" . }}
{{ include "consortium-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: concord
{{- end }}

{{/* Labels that select this release's pods (add app.kubernetes.io/component). */}}
{{- define "consortium-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "consortium-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount pods run as. */}}
{{- define "consortium-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "consortium-server.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, or repository@digest when a digest is pinned. */}}
{{- define "consortium-server.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}
{{- end }}

{{/* Secret holding the database URL. */}}
{{- define "consortium-server.databaseSecretName" -}}
{{- default (printf "%s-database" (include "consortium-server.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{/* Secret holding the tree-head signing key. */}}
{{- define "consortium-server.auditSecretName" -}}
{{- default (printf "%s-audit-key" (include "consortium-server.fullname" .)) .Values.audit.existingSecret }}
{{- end }}

{{/* Secret holding the SuperLink's TLS certificate, key and CA. */}}
{{- define "consortium-server.superlinkTlsSecretName" -}}
{{- default (printf "%s-tls" (include "consortium-server.superlinkName" .)) .Values.superlink.tls.existingSecret }}
{{- end }}

{{/* Pod-level securityContext shared by every pod. */}}
{{- define "consortium-server.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level securityContext shared by every container. */}}
{{- define "consortium-server.containerSecurityContext" -}}
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
{{- define "consortium-server.flowerEnv" -}}
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

{{/* Environment of the API server and the migration Job (settings ConfigMap + DB URL). */}}
{{- define "consortium-server.serverEnv" -}}
- name: CONCORD_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "consortium-server.databaseSecretName" . }}
      key: {{ .Values.database.existingSecretKey }}
- name: HOME
  value: /tmp
{{- end }}
