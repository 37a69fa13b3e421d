FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
COPY examples ./examples
RUN pip install --no-cache-dir .
ENV PYTHONPATH=/app
CMD ["taskscheduler", "queue"]
