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

{{/*
The image reference: repository:tag, or repository@digest when a digest is pinned. With
global.imageRegistry (a mirror), the repository's own registry host (a first path segment
with a dot or a colon, or localhost) is replaced by it and the path is kept.
*/}}
{{- define "site-node.image" -}}
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
{{- define "site-node.imagePullSecrets" -}}
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

{{/* Secret holding the site's private keys (always created by you, never by the chart). */}}
{{- define "site-node.keysSecretName" -}}
{{- required "siteKeys.existingSecret is required: create it from the output of site-node keys init" .Values.siteKeys.existingSecret }}
{{- end }}

{{/* Secret holding the OIDC client secret. */}}
{{- define "site-node.credentialsSecretName" -}}
{{- default (printf "%s-credentials" (include "site-node.fullname" .)) .Values.credentials.existingSecret }}
{{- end }}

{{/* Pod-level securityContext shared by every pod (a null id is left to the platform). */}}
{{- define "site-node.podSecurityContext" -}}
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

{{/* The client secret, for the containers that talk to the consortium API (the agent and
the helm test pod; never the SuperNode, which does not): a file on a Secret volume, never an
environment variable (which every child process would inherit). */}}
{{- define "site-node.credentialsEnv" -}}
- name: CONCORD_SITE_CLIENT_SECRET_FILE
  value: /etc/concord/site-credentials/client-secret
{{- end }}
{{- define "site-node.credentialsMount" -}}
- name: credentials
  mountPath: /etc/concord/site-credentials
  readOnly: true
{{- end }}
{{- define "site-node.credentialsVolume" -}}
- name: credentials
  secret:
    secretName: {{ include "site-node.credentialsSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.credentials.existingSecretKey }}
        path: client-secret
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
{{- include "site-node.caBundleMount" . }}
{{- end }}

{{/*
The extra CA bundle (caBundle): an init container appends it to the image's system bundle in
an in-memory volume; SSL_CERT_FILE and REQUESTS_CA_BUNDLE (httpx, requests) name the result.
Each fragment renders nothing when caBundle is unset.
*/}}
{{- define "site-node.caBundleEnabled" -}}
{{- if or .Values.caBundle.certificates .Values.caBundle.existingConfigMap }}true{{ end }}
{{- end }}
{{- define "site-node.caBundleConfigMapName" -}}
{{- default (printf "%s-ca-bundle" (include "site-node.fullname" .)) .Values.caBundle.existingConfigMap }}
{{- end }}
{{- define "site-node.caBundleInitContainer" -}}
{{- if include "site-node.caBundleEnabled" . }}
- name: install-ca-bundle
  image: {{ include "site-node.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - sh
    - -c
    - cat /etc/ssl/certs/ca-certificates.crt /etc/concord/ca-bundle-extra/ca-bundle.crt > /etc/concord/ca-bundle/ca-bundle.crt
  securityContext:
    {{- include "site-node.containerSecurityContext" . | nindent 4 }}
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
{{- define "site-node.caBundleEnv" -}}
{{- if include "site-node.caBundleEnabled" . }}
- name: SSL_CERT_FILE
  value: /etc/concord/ca-bundle/ca-bundle.crt
- name: REQUESTS_CA_BUNDLE
  value: /etc/concord/ca-bundle/ca-bundle.crt
{{- end }}
{{- end }}
{{- define "site-node.caBundleMount" -}}
{{- if include "site-node.caBundleEnabled" . }}
- name: ca-bundle
  mountPath: /etc/concord/ca-bundle
  readOnly: true
{{- end }}
{{- end }}
{{- define "site-node.caBundleVolumes" -}}
{{- if include "site-node.caBundleEnabled" . }}
- name: ca-bundle-extra
  configMap:
    name: {{ include "site-node.caBundleConfigMapName" . }}
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
A pod's metadata: the chart's labels over podLabels (the chart's win: the selector depends
on them); the given annotations (checksums, hooks) over podAnnotations.
Arguments: (list $ extraLabels annotations).
*/}}
{{- define "site-node.podMetadata" -}}
{{- $root := index . 0 }}
{{- $labels := merge (dict) (fromYaml (include "site-node.labels" $root)) ((index . 1) | default dict) ($root.Values.podLabels | default dict) }}
{{- $annotations := merge (dict) ((index . 2) | default dict) ($root.Values.podAnnotations | default dict) -}}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Checksum of a ConfigMap or Secret the pod reads, for a pod annotation that rolls it when it
changes. Arguments: (list $ kind "template-file.yaml" existingName). The chart's own object:
its rendered text. An existing one: its data as lookup finds it (nothing under `helm
template`; after replacing such an object, `helm upgrade` or a rollout restart rolls the pod).
*/}}
{{- define "site-node.checksum" -}}
{{- $root := index . 0 }}
{{- $existing := index . 3 }}
{{- if $existing }}
{{- $object := lookup "v1" (index . 1) $root.Release.Namespace $existing }}
{{- dig "data" dict ($object | default dict) | toJson | sha256sum }}
{{- else }}
{{- include (print $root.Template.BasePath "/" (index . 2)) $root | sha256sum }}
{{- end }}
{{- end }}

{{/*
proxy: HTTP_PROXY, HTTPS_PROXY and NO_PROXY (and their lowercase forms, which gRPC and
most libraries read) for the containers that talk to the consortium. NO_PROXY always adds
loopback (the SuperNode's ClientAppIo API is on 127.0.0.1) and the cluster's own names.
Nothing when neither proxy is set.
*/}}
{{- define "site-node.proxyEnv" -}}
{{- $proxy := .Values.proxy }}
{{- if or $proxy.httpProxy $proxy.httpsProxy }}
{{- $no := concat (splitList "," ($proxy.noProxy | default "")) (list "localhost" "127.0.0.1" "::1" ".svc" ".cluster.local") }}
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

{{- /* The agent's probes: its heartbeat (a pass finished within the limit). The limit
covers a poll interval, the longest back-off (300 s) and a slow pass (600 s). */ -}}
{{- define "site-node.agentProbeCommand" -}}
- site-node
- agent-health
- --max-age-s
- {{ add (int (ceil .Values.agent.pollIntervalSeconds)) 900 | quote }}
{{- end }}

{{/* The DNS egress rule of the NetworkPolicy (networkPolicy.dns). */}}
{{- define "site-node.dnsEgress" -}}
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
