{{/* The chart name, unless overridden. */}}
{{- define "ferrolb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: the release name, with the chart name appended
unless it is already in it. */}}
{{- define "ferrolb.fullname" -}}
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

{{/* Labels every object carries. */}}
{{- define "ferrolb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ferrolb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of a component: include with (list . "controller"). */}}
{{- define "ferrolb.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "ferrolb.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* All labels of a component's objects: include with (list . "controller"). */}}
{{- define "ferrolb.componentLabels" -}}
{{ include "ferrolb.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Names. */}}
{{- define "ferrolb.controller.name" -}}{{ include "ferrolb.fullname" . }}-controller{{- end }}
{{- define "ferrolb.speaker.name" -}}{{ include "ferrolb.fullname" . }}-speaker{{- end }}
{{- define "ferrolb.controller.leaseName" -}}{{ default (include "ferrolb.controller.name" .) .Values.controller.lease.name }}{{- end }}

{{/* The membership Secret the speakers read, or "" when the membership is not authenticated. */}}
{{- define "ferrolb.memberlist.secretName" -}}
{{- if .Values.speaker.memberlist.enabled }}
{{- default (printf "%s-memberlist" (include "ferrolb.fullname" .)) .Values.speaker.memberlist.existingSecret }}
{{- end }}
{{- end }}

{{/* Image reference of a component: include with (list . .Values.controller.image). */}}
{{- define "ferrolb.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
