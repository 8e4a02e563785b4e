FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bil_transform ./bil_transform
RUN pip install --no-cache-dir . && useradd --create-home bil
USER bil
EXPOSE 8000
ENTRYPOINT ["bil-transform"]
CMD ["demo", "--host", "0.0.0.0"]
