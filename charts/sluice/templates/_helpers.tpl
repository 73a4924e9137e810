{{/* The labels every object carries (the same as manifests/). */}}
{{- define "sluice.labels" -}}
app.kubernetes.io/name: sluice-agent
app.kubernetes.io/part-of: sluice
{{- end }}

{{/* The CRI socket: the explicit one, else the runtime's. */}}
{{- define "sluice.criSocket" -}}
{{- if .Values.criSocket -}}
{{ .Values.criSocket }}
{{- else if eq .Values.runtime "crio" -}}
/var/run/crio/crio.sock
{{- else -}}
/run/containerd/containerd.sock
{{- end -}}
{{- end }}
