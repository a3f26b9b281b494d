{{/*
Names. Objects are named after the release ("cinderblock-controller"), or
"<release>-cinderblock-..." when the release name doesn't contain the chart's.
*/}}
{{- define "cinderblock.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cinderblock.controllerName" -}}{{ include "cinderblock.fullname" . }}-controller{{- end -}}
{{- define "cinderblock.nodeName" -}}{{ include "cinderblock.fullname" . }}-node{{- end -}}
{{/* The cluster CA's Secret, and the ConfigMap that publishes its certificate. */}}
{{- define "cinderblock.caName" -}}{{ .Values.tls.caSecret | default (printf "%s-ca" (include "cinderblock.fullname" .)) }}{{- end -}}

{{- define "cinderblock.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include with (list . "controller"). */}}
{{- define "cinderblock.selectorLabels" -}}
{{- $top := index . 0 -}}
app.kubernetes.io/name: {{ $top.Chart.Name }}
app.kubernetes.io/instance: {{ $top.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "cinderblock.componentLabels" -}}
{{ include "cinderblock.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "cinderblock.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "cinderblock.sidecarImage" -}}
{{- printf "%s:%s" .image.repository .image.tag -}}
{{- end -}}

{{/* Where the node plugin's CSI socket lives on the host. */}}
{{- define "cinderblock.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.node.kubeletDir) .Values.driverName -}}
{{- end -}}

{{/* Checks across values that the schema can't express. */}}
{{- define "cinderblock.validate" -}}
{{- if and (gt (int .Values.controller.replicas) 1) (not .Values.controller.leaderElection.enabled) -}}
{{- fail "controller.replicas > 1 needs controller.leaderElection.enabled: true (otherwise several controllers would change the same records)" -}}
{{- end -}}
{{- $defaults := 0 -}}
{{- $names := dict -}}
{{- range .Values.storageClasses -}}
{{- if .isDefaultClass }}{{ $defaults = add1 $defaults }}{{ end -}}
{{- if hasKey $names .name -}}
{{- fail (printf "storageClasses: the name %q appears twice" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- if gt $defaults 1 -}}
{{- fail "storageClasses: at most one class may set isDefaultClass: true" -}}
{{- end -}}
{{- $ports := list .Values.node.agentPort .Values.node.nbdPort .Values.node.healthPort .Values.node.registrarHealthPort -}}
{{- if .Values.metrics.enabled }}{{ $ports = append $ports .Values.metrics.nodePort }}{{ end -}}
{{- if ne (len $ports) (len (uniq $ports)) -}}
{{- fail "node: agentPort, nbdPort, healthPort, registrarHealthPort and metrics.nodePort must differ" -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (the issuer that signs the CA)" -}}
{{- end -}}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.controllerPort) (int .Values.controller.healthPort)) -}}
{{- fail "metrics.controllerPort and controller.healthPort must differ" -}}
{{- end -}}
{{- end -}}

{{/*
A ClusterRole or Role with its binding to one of the chart's service
accounts: include with (dict "top" $ "kind" "ClusterRole" "name" NAME
"component" "controller" "serviceAccount" SA "rules" (include RULES $)).
*/}}
{{- define "cinderblock.boundRole" -}}
{{- $top := .top -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ .kind }}
metadata:
  name: {{ .name }}
  {{- if eq .kind "Role" }}
  namespace: {{ $top.Release.Namespace }}
  {{- end }}
  labels:
    {{- include "cinderblock.componentLabels" (list $top .component) | nindent 4 }}
rules:
{{- .rules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ .kind }}Binding
metadata:
  name: {{ .name }}
  {{- if eq .kind "Role" }}
  namespace: {{ $top.Release.Namespace }}
  {{- end }}
  labels:
    {{- include "cinderblock.componentLabels" (list $top .component) | nindent 4 }}
subjects:
  - kind: ServiceAccount
    name: {{ .serviceAccount }}
    namespace: {{ $top.Release.Namespace }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {{ .kind }}
  name: {{ .name }}
{{- end -}}

{{/* Security context and resources shared by the sidecar containers. */}}
{{- define "cinderblock.sidecarContainer" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- with .Values.sidecars.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
