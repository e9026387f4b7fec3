FROM python:3.11-slim
WORKDIR /srv/poolrelay
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY billing ./billing
COPY pool ./pool
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --system poolrelay
USER poolrelay
EXPOSE 8080
CMD ["poolrelay", "serve", "--host", "0.0.0.0", "--port", "8080"]
