# kv-operator: one statically linked binary (x86_64-unknown-linux-gnu,
# crt-static) and nothing else. No CA bundle: kube-rs trusts the service-account
# CA mounted in-cluster (or the kubeconfig's), never system roots. Built by
# scripts/build-images.sh from a context directory that holds only the binary;
# FROM scratch needs no registry.
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="kv-operator" \
      org.opencontainers.image.description="kvstore operator: reconciles KvCluster (kvstore.dev/v1alpha1)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="kvstore" \
      org.opencontainers.image.source="https://github.com/kvstore/kvstore"
COPY kv-operator /kv-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/kv-operator"]
