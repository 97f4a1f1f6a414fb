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

{{/*
The image reference: repository:tag, or repository@digest when a digest is pinned. With
global.imageRegistry (a mirror), the repository's own registry host (a first path segment
with a dot or a colon, or localhost) is replaced by it and the path is kept.
*/}}
{{- define "consortium-server.image" -}}
{{- $repository := .Values.image.repository }}
{{- with (dig "imageRegistry" "" (.Values.global | default dict)) }}
{{- $parts := splitList "/" $repository }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $repository = rest $parts | join "/" }}
{{- end }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository .Values.image.tag }}
{{- end }}
{{- end }}

{{/* imagePullSecrets of every pod: the chart's and global.imagePullSecrets (names or {name}). */}}
{{- define "consortium-server.imagePullSecrets" -}}
{{- $names := list }}
{{- range .Values.imagePullSecrets }}
{{- $names = append $names .name }}
{{- end }}
{{- range (dig "imagePullSecrets" list (.Values.global | default dict)) }}
{{- if kindIs "string" . }}
{{- $names = append $names . }}
{{- else }}
{{- $names = append $names .name }}
{{- end }}
{{- end }}
{{- with ($names | compact | uniq) }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secret holding the database URL. */}}
{{- define "consortium-server.databaseSecretName" -}}
{{- default (printf "%s-database" (include "consortium-server.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{/*
The Secret whose data the API pods' database checksum follows: none of ours with
database.existingSecret (yours) or database.host (your password Secret).
*/}}
{{- define "consortium-server.databaseExistingSecret" -}}
{{- .Values.database.existingSecret | default (ternary .Values.database.passwordSecret.name "" (not (empty .Values.database.host))) }}
{{- end }}

{{/* Name of the migration hook's Job, and of the hook's ServiceAccount and Secret. */}}
{{- define "consortium-server.migrateName" -}}
{{- include "consortium-server.fullname" . | trunc 45 | trimSuffix "-" }}-migrate
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
{{- include "consortium-server.objectChecksum" (list (index . 0) "Secret" (index . 1) (index . 2)) }}
{{- end }}

{{/* The same for a ConfigMap: (list $ "template-file.yaml" existingConfigMapName). */}}
{{- define "consortium-server.configMapChecksum" -}}
{{- include "consortium-server.objectChecksum" (list (index . 0) "ConfigMap" (index . 1) (index . 2)) }}
{{- end }}

{{/* (list $ kind "template-file.yaml" existingName): behind both checksums above. */}}
{{- define "consortium-server.objectChecksum" -}}
{{- $root := index . 0 }}
{{- $existing := index . 3 }}
{{- if $existing }}
{{- $object := lookup "v1" (index . 1) $root.Release.Namespace $existing }}
{{- dig "data" dict ($object | default dict) | toJson | sha256sum }}
{{- else }}
{{- include (print $root.Template.BasePath "/" (index . 2)) $root | sha256sum }}
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

{{/* Pod-level securityContext shared by every pod (a null id is left to the platform). */}}
{{- define "consortium-server.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext.fsGroup }}
fsGroup: {{ . }}
{{- end }}
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
{{ include "consortium-server.databaseEnv" (list . (include "consortium-server.databaseSecretName" .)) }}
- name: HOME
  value: /tmp
{{- end }}

{{/*
CONCORD_DATABASE__URL. database.url or database.existingSecret: from that Secret (argument:
the Secret's name, which the migration hook replaces by its own). database.host: composed
from the parts, without the password, which PGPASSWORD carries from database.passwordSecret
(libpq reads it when the URL has none, so the password needs no URL escaping).
*/}}
{{- define "consortium-server.databaseEnv" -}}
{{- $root := index . 0 }}
{{- $db := $root.Values.database }}
{{- if $db.host }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $db.passwordSecret.name }}
      key: {{ $db.passwordSecret.key }}
- name: CONCORD_DATABASE__URL
  value: {{ include "consortium-server.databaseUrl" $root | quote }}
{{- else }}
- name: CONCORD_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ index . 1 }}
      key: {{ $db.existingSecretKey }}
{{- end }}
{{- end }}

{{/* The URL composed from database.host/port/name/user/parameters (no password in it). */}}
{{- define "consortium-server.databaseUrl" -}}
{{- $db := .Values.database }}
{{- $query := list }}
{{- range $key, $value := $db.parameters }}
{{- $query = append $query (printf "%s=%s" (urlquery $key) (urlquery (toString $value))) }}
{{- end }}
{{- printf "postgresql+psycopg://%s@%s:%d/%s" (urlquery $db.user) $db.host (int $db.port) (urlquery $db.name) }}
{{- with $query }}?{{ join "&" . }}{{ end }}
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

{{/*
A pod template's metadata: the chart's labels (with app.kubernetes.io/component) over
podLabels and the component's own podLabels (the chart's win: selectors depend on them);
the given annotations (checksums) over the component's podAnnotations and podAnnotations.
Arguments: (list $ component componentLabels annotations componentAnnotations).
*/}}
{{- define "consortium-server.podMetadata" -}}
{{- $root := index . 0 }}
{{- $chart := fromYaml (include "consortium-server.labels" $root) }}
{{- $_ := set $chart "app.kubernetes.io/component" (index . 1) }}
{{- $labels := merge (dict) $chart ((index . 2) | default dict) ($root.Values.podLabels | default dict) }}
{{- $annotations := merge (dict) ((index . 3) | default dict) ((index . 4) | default dict) ($root.Values.podAnnotations | default dict) -}}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
proxy: HTTP_PROXY, HTTPS_PROXY and NO_PROXY (and their lowercase forms, which gRPC and
most libraries read) for containers that talk outward. NO_PROXY always adds loopback and
the cluster's own names (.svc, .cluster.local, the SuperLink's Control address), which
must never go through the proxy. Nothing when neither proxy is set.
*/}}
{{- define "consortium-server.proxyEnv" -}}
{{- $proxy := .Values.proxy }}
{{- if or $proxy.httpProxy $proxy.httpsProxy }}
{{- $link := include "consortium-server.superlinkAddress" . | splitList ":" | first }}
{{- $no := concat (splitList "," ($proxy.noProxy | default "")) (list "localhost" "127.0.0.1" "::1" ".svc" ".cluster.local" $link) }}
{{- $noProxy := $no | compact | uniq | join "," | replace " " "" }}
{{- range $name, $value := dict "HTTP_PROXY" $proxy.httpProxy "HTTPS_PROXY" $proxy.httpsProxy "NO_PROXY" $noProxy }}
{{- if $value }}
- name: {{ $name }}
  value: {{ $value | quote }}
- name: {{ lower $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The DNS egress rule of both NetworkPolicies (networkPolicy.dns). */}}
{{- define "consortium-server.dnsEgress" -}}
{{- $dns := .Values.networkPolicy.dns -}}
- ports:
    {{- range $dns.ports }}
    - port: {{ . }}
      protocol: UDP
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- if or $dns.namespace $dns.podSelector }}
  to:
    - namespaceSelector:
        {{- if $dns.namespace }}
        matchLabels:
          kubernetes.io/metadata.name: {{ $dns.namespace }}
        {{- else }} {}
        {{- end }}
      {{- with $dns.podSelector }}
      podSelector:
        matchLabels:
          {{- toYaml . | nindent 10 }}
      {{- end }}
  {{- end }}
{{- end }}

{{/*
The API server's settings (CONCORD_* variables, the data of the -settings ConfigMap; the
migration hook Job renders them as its env, since it runs before that ConfigMap exists).
*/}}
{{- define "consortium-server.settingsData" -}}
CONCORD_ENVIRONMENT: {{ .Values.environment | quote }}
CONCORD_DATA_DIR: /var/lib/concord
CONCORD_LOG_LEVEL: {{ .Values.logLevel | quote }}
CONCORD_LOG_JSON: {{ .Values.logJson | quote }}
CONCORD_API__HOST: "0.0.0.0"
CONCORD_API__PORT: {{ .Values.server.port | quote }}
{{- with .Values.server.publicUrl }}
CONCORD_API__PUBLIC_URL: {{ . | quote }}
{{- end }}
CONCORD_API__MAX_BODY_BYTES: {{ .Values.server.maxBodyBytes | int64 | quote }}
CONCORD_API__MAX_KEY_BODY_BYTES: {{ .Values.server.maxKeyBodyBytes | int64 | quote }}
CONCORD_DATABASE__POOL_SIZE: {{ .Values.database.poolSize | quote }}
CONCORD_DATABASE__AUTO_MIGRATE: {{ not .Values.migrations.enabled | quote }}
CONCORD_IDENTITY__MODE: keycloak
CONCORD_IDENTITY__KEYCLOAK_URL: {{ .Values.identity.keycloakUrl | quote }}
CONCORD_IDENTITY__KEYCLOAK_REALM: {{ .Values.identity.realm | quote }}
{{- with .Values.identity.issuer }}
CONCORD_IDENTITY__KEYCLOAK_ISSUER: {{ . | quote }}
{{- end }}
CONCORD_IDENTITY__KEYCLOAK_VERIFY_TLS: {{ .Values.identity.verifyTls | quote }}
CONCORD_IDENTITY__AUDIENCE: {{ .Values.identity.audience | quote }}
CONCORD_IDENTITY__ORGANISATION_CLAIM: {{ .Values.identity.organisationClaim | quote }}
CONCORD_AUDIT__WITNESS_QUORUM: {{ .Values.audit.witnessQuorum | quote }}
CONCORD_AUDIT__LOG_ID: {{ .Values.audit.logId | quote }}
CONCORD_POLICY__DIRECTORY: {{ ternary "/etc/concord/policies" "/opt/concord/share/policies" (not (empty .Values.policies.consortium)) | quote }}
CONCORD_POLICY__MEMBER_ORGANISATIONS: {{ .Values.policies.memberOrganisations | toJson | quote }}
CONCORD_STUDIES__APPROVAL_WINDOW_DAYS: {{ .Values.studies.approvalWindowDays | quote }}
CONCORD_FEDERATION__SUPERLINK_ADDRESS: {{ include "consortium-server.superlinkAddress" . | quote }}
CONCORD_FEDERATION__ROOT_CERTIFICATES: {{ include "consortium-server.superlinkCaFile" . | quote }}
CONCORD_FEDERATION__CLIENT_CERTIFICATE: {{ include "consortium-server.controlClientCertFile" . | quote }}
CONCORD_FEDERATION__CLIENT_PRIVATE_KEY: {{ include "consortium-server.controlClientKeyFile" . | quote }}
CONCORD_FEDERATION__SERVERAPP_TOKEN_FILE: {{ include "consortium-server.federationTokenFile" . | quote }}
CONCORD_FEDERATION__REGISTER_SUPERNODES: {{ .Values.federation.registerSupernodes | quote }}
CONCORD_FEDERATION__RESUME_ON_START: {{ .Values.federation.resumeOnStart | quote }}
CONCORD_FEDERATION__RUN_LIVENESS_S: {{ .Values.federation.runLivenessSeconds | quote }}
CONCORD_FEDERATION__MAX_RESTARTS: {{ .Values.federation.maxRestarts | int | quote }}
{{- end }}
