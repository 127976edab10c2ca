{{/*
The chart name, or nameOverride: the app.kubernetes.io/name label.
*/}}
{{- define "portcullis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else the release name if it contains
the chart name, else "<release>-<chart>". The default release "portcullis" gives the names
deploy/ uses (portcullis-operator, portcullis-requester, ...).
*/}}
{{- define "portcullis.fullname" -}}
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

{{/*
The operator's name: its Deployment, service account, ClusterRole and ClusterRoleBinding.
*/}}
{{- define "portcullis.operator" -}}
{{- include "portcullis.fullname" . }}-operator
{{- end }}

{{/*
The agent's name: its DaemonSet, service account, Role and RoleBinding.
*/}}
{{- define "portcullis.agent" -}}
{{- include "portcullis.fullname" . }}-agent
{{- end }}

{{/*
Helm's standard labels, on every object the chart renders (and nothing else: the objects
are otherwise those of deploy/).
*/}}
{{- define "portcullis.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The selector labels of a component (operator or agent): also its pods' labels.
Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portcullis.name" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Fails rendering with message (the argument), under `helm lint` too: there `required` and
`fail` only log their message and rendering goes on, so this then asks for a template named
after the message, which does not exist, and lint fails with an error that quotes it.
*/}}
{{- define "portcullis.fail" -}}
{{- fail . }}
{{- include . dict }}
{{- end }}

{{/*
The agent's NSG, validated, as JSON {"namespace": ..., "name": ...}.
*/}}
{{- define "portcullis.agentNsg" -}}
{{- $missing := "agent.nsg is required when agent.enabled is true: the NSG every node enforces, as NAMESPACE/NAME (e.g. --set agent.nsg=default/web-nsg)" }}
{{- $nsg := required $missing .Values.agent.nsg }}
{{- if not $nsg }}
{{- include "portcullis.fail" $missing }}
{{- end }}
{{- $parts := splitList "/" $nsg }}
{{- if or (ne (len $parts) 2) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (first $parts))) (not (regexMatch "^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$" (last $parts))) }}
{{- include "portcullis.fail" (printf "agent.nsg must be NAMESPACE/NAME (e.g. default/web-nsg), not %q" $nsg) }}
{{- end }}
{{- dict "namespace" (first $parts) "name" (last $parts) | toJson }}
{{- end }}

{{/*
The agent's namespace (agent.namespace), validated: a namespace name, and not the release
namespace when the chart is to create it (Helm or the user created that one already, and it
is the operator's, which should stay at Pod Security level restricted).
*/}}
{{- define "portcullis.agentNamespace" -}}
{{- $namespace := toString .Values.agent.namespace }}
{{- if or (gt (len $namespace) 63) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $namespace)) }}
{{- include "portcullis.fail" (printf "agent.namespace must be a namespace name (e.g. portcullis-agent), not %q" $namespace) }}
{{- end }}
{{- if and .Values.agent.createNamespace (eq $namespace .Release.Namespace) }}
{{- include "portcullis.fail" (printf "agent.namespace is the release namespace %q, which the chart cannot create: give the agent a namespace of its own (agent.namespace, default portcullis-agent), or set agent.createNamespace=false and label %q pod-security.kubernetes.io/enforce=privileged yourself" $namespace $namespace) }}
{{- end }}
{{- $namespace }}
{{- end }}

{{/*
A log format value, validated.
*/}}
{{- define "portcullis.logFormat" -}}
{{- if not (has . (list "json" "text")) }}
{{- include "portcullis.fail" (printf "a logFormat must be json or text, not %q" .) }}
{{- end }}
{{- . }}
{{- end }}
