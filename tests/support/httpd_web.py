"""The deployment the rollout tests on real Docker run: busybox httpd serving /ready.html,
with a readiness check on a page of the test's choice."""

from __future__ import annotations


def httpd_web(image: str, *, replicas: int, update: str, env: str = "{}", ready_page: str = "/ready.html") -> str:
    """``update`` and ``env`` are YAML flow mappings, e.g. ``"{max_surge: 1, max_unavailable: 0}"``."""
    return f"""
apiVersion: comp/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {replicas}
  image: {image}
  command: ["sh", "-c", "mkdir -p /www && echo ok > /www/ready.html && exec httpd -f -p 80 -h /www"]
  env: {env}
  resources: {{cpu: 0.05, memory: 16Mi}}
  ports: [{{container_port: 80, name: http}}]
  stop_grace_period: 1s
  health:
    readiness: {{http: {{path: {ready_page}, port: http}}, interval: 0.5s, failure_threshold: 1}}
  update: {update}
"""
