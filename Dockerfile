FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
COPY examples ./examples
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin taskscheduler
ENV PYTHONPATH=/app
# Jobs run with the node's rights: never as root. The code under /app stays root's, read-only to the node.
USER taskscheduler
CMD ["taskscheduler", "queue"]
