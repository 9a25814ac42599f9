# kv-node: one statically linked binary (x86_64-unknown-linux-gnu, crt-static) and
# an empty /data, nothing else. Built by scripts/build-images.sh from a context directory that
# holds only the binary; FROM scratch needs no registry.
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="kv-node" \
      org.opencontainers.image.description="kvstore node: SQLite storage, HTTP API, replication" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="kvstore" \
      org.opencontainers.image.source="https://github.com/kvstore/kvstore"
COPY kv-node /kv-node
# An empty /data owned by the node's user: Docker initialises a new named
# volume mounted there with this owner, so the node can write to it (on
# Kubernetes the pod's fsGroup does the same for the PVC).
COPY --chown=65532:65532 data /data
USER 65532:65532
EXPOSE 7400 7401
ENTRYPOINT ["/kv-node"]
