FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
COPY examples ./examples
# With the operator extras: the dashboard (`taskscheduler dashboard`) and a queue node's Prometheus metrics
# (`queue --metrics-port`). The embedded server (GPL-2.0) stays out: the image talks to a real replica set.
RUN pip install --no-cache-dir ".[dashboard,metrics]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin taskscheduler
ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1
# Jobs run with the node's rights: never as root. The code under /app stays root's, read-only to the node.
USER taskscheduler
CMD ["taskscheduler", "queue"]
