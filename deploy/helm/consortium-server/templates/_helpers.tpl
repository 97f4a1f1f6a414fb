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

{{/* Name of the SuperLink's Control Service (ClusterIP: only the API pods dial it). */}}
{{- define "consortium-server.superlinkControlName" -}}
{{- printf "%s-control" (include "consortium-server.superlinkName" .) | trunc 63 | trimSuffix "-" }}
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

{{/* Secret holding the API's client certificate and key for the SuperLink's Control API. */}}
{{- define "consortium-server.controlClientSecretName" -}}
{{- default (printf "%s-control-client-tls" (include "consortium-server.fullname" .)) .Values.federation.controlClientTls.existingSecret }}
{{- end }}

{{/* Secret holding the federation token (the ServerApp's credential on the internal API). */}}
{{- define "consortium-server.federationSecretName" -}}
{{- default (printf "%s-federation-token" (include "consortium-server.fullname" .)) .Values.federation.existingSecret }}
{{- end }}

{{/* Where both Deployments mount the federation token (one file, `token`, mode 0440). */}}
{{- define "consortium-server.federationTokenFile" -}}
/etc/concord/federation-token/token
{{- end }}

{{/* Where the API pods mount the SuperLink's CA certificate (ca.crt of its TLS Secret only). */}}
{{- define "consortium-server.superlinkCaFile" -}}
/etc/concord/superlink-ca/ca.crt
{{- end }}

{{/* Where the API pods mount their Control client certificate and key (tls.crt, tls.key). */}}
{{- define "consortium-server.controlClientCertFile" -}}
/etc/concord/control-client/tls.crt
{{- end }}
{{- define "consortium-server.controlClientKeyFile" -}}
/etc/concord/control-client/tls.key
{{- end }}

{{/*
The launcher's private directory in the SuperLink's pod (an in-memory emptyDir): deny stubs
and the SuperExec secret, which Flower and the ServerApp executor (the launcher's child)
share and nothing else holds. processes.py uses <work dir>/launcher the same way.
*/}}
{{- define "consortium-server.launcherDir" -}}
/run/concord-superlink/launcher
{{- end }}

{{/*
The federation token the chart's Secret holds: federation.token; else the one already in
the release's Secret (lookup, so upgrades keep it); else a fresh random one (first
install, or `helm template` where lookup finds nothing). Generated once per render and
remembered, so that the Secret and the pods' checksum annotation see the same value.
*/}}
{{- define "consortium-server.federationToken" -}}
{{- if .Values.federation.token }}
{{- .Values.federation.token }}
{{- else }}
{{- if not (hasKey .Values.federation "_renderedToken") }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "consortium-server.federationSecretName" .) }}
{{- $kept := dig "data" .Values.federation.existingSecretKey "" ($secret | default dict) }}
{{- $_ := set .Values.federation "_renderedToken" (ternary (b64dec $kept) (randAlphaNum 48) (not (empty $kept))) }}
{{- end }}
{{- index .Values.federation "_renderedToken" }}
{{- end }}
{{- end }}

{{/*
Checksum of a Secret the pods read, for a pod annotation that rolls them when it changes.
Arguments: (list $ "template-file.yaml" existingSecretName). The chart's own Secret: its
rendered text. An existingSecret: its data as lookup finds it (nothing under `helm
template`; after replacing such a Secret, `helm upgrade` or a rollout restart rolls the pods).
*/}}
{{- define "consortium-server.secretChecksum" -}}
{{- $root := index . 0 }}
{{- $existing := index . 2 }}
{{- if $existing }}
{{- $secret := lookup "v1" "Secret" $root.Release.Namespace $existing }}
{{- dig "data" dict ($secret | default dict) | toJson | sha256sum }}
{{- else }}
{{- include (print $root.Template.BasePath "/" (index . 1)) $root | sha256sum }}
{{- end }}
{{- end }}

{{/* host:port where the API reaches the SuperLink's Control API (default: its Control Service). */}}
{{- define "consortium-server.superlinkAddress" -}}
{{- default (printf "%s.%s.svc:%d" (include "consortium-server.superlinkControlName" .) .Release.Namespace (int .Values.superlink.controlPort)) .Values.federation.superlinkAddress }}
{{- end }}

{{/* The API's in-cluster URL, which the ServerApp (in the SuperLink's pod) reports rounds to. */}}
{{- define "consortium-server.apiInternalUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "consortium-server.fullname" .) .Release.Namespace (int .Values.server.service.port) }}
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

{{/*
The extra CA bundle (caBundle): an init container appends it to the image's system bundle in
an in-memory volume; SSL_CERT_FILE and REQUESTS_CA_BUNDLE (httpx, requests) name the result.
Each fragment renders nothing when caBundle is unset.
*/}}
{{- define "consortium-server.caBundleEnabled" -}}
{{- if or .Values.caBundle.certificates .Values.caBundle.existingConfigMap }}true{{ end }}
{{- end }}
{{- define "consortium-server.caBundleConfigMapName" -}}
{{- default (printf "%s-ca-bundle" (include "consortium-server.fullname" .)) .Values.caBundle.existingConfigMap }}
{{- end }}
{{- define "consortium-server.caBundleInitContainer" -}}
{{- if include "consortium-server.caBundleEnabled" . }}
- name: install-ca-bundle
  image: {{ include "consortium-server.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - sh
    - -c
    - cat /etc/ssl/certs/ca-certificates.crt /etc/concord/ca-bundle-extra/ca-bundle.crt > /etc/concord/ca-bundle/ca-bundle.crt
  securityContext:
    {{- include "consortium-server.containerSecurityContext" . | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      cpu: 100m
      memory: 64Mi
  volumeMounts:
    - name: ca-bundle-extra
      mountPath: /etc/concord/ca-bundle-extra
      readOnly: true
    - name: ca-bundle
      mountPath: /etc/concord/ca-bundle
{{- end }}
{{- end }}
{{- define "consortium-server.caBundleEnv" -}}
{{- if include "consortium-server.caBundleEnabled" . }}
- name: SSL_CERT_FILE
  value: /etc/concord/ca-bundle/ca-bundle.crt
- name: REQUESTS_CA_BUNDLE
  value: /etc/concord/ca-bundle/ca-bundle.crt
{{- end }}
{{- end }}
{{- define "consortium-server.caBundleMount" -}}
{{- if include "consortium-server.caBundleEnabled" . }}
- name: ca-bundle
  mountPath: /etc/concord/ca-bundle
  readOnly: true
{{- end }}
{{- end }}
{{- define "consortium-server.caBundleVolumes" -}}
{{- if include "consortium-server.caBundleEnabled" . }}
- name: ca-bundle-extra
  configMap:
    name: {{ include "consortium-server.caBundleConfigMapName" . }}
    items:
      - key: {{ .Values.caBundle.existingConfigMapKey }}
        path: ca-bundle.crt
- name: ca-bundle
  emptyDir:
    medium: Memory
    sizeLimit: 4Mi
{{- end }}
{{- end }}
