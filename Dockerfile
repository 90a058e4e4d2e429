# authplane control plane, decision service and development servers (echo, identity provider).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY authplane ./authplane
COPY policies ./policies
RUN pip install --no-cache-dir . && useradd --system --uid 10001 authplane
USER authplane
EXPOSE 18000 9001 9002 9100
ENTRYPOINT ["authplane"]
CMD ["serve", "/policies"]
