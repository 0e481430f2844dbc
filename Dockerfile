# Weft's image: weftctl (runs the controller: `weftctl controller`), node-proxy (run by
# the DaemonSet) and waypoint (run by each Gateway's Deployment), each role's own binary
# a fraction of weftctl's size, and weft-cni (the CNI plugin and its installer, copied
# onto each node by the node-proxy DaemonSet's init container). The manifests are rendered by
# `weftctl install`; see docs/install.md.
#
# The binaries are built beforehand, on a glibc no newer than the base image's
# (Debian 12), and copied in; nothing is compiled here:
#
#   cargo build --release --workspace --bins
#   docker build -t <registry>/weft:<version> .
FROM debian:bookworm-slim

# nftables and iproute2: the capture rules (`nft`, `ip rule`, `ip route`) in pods'
# network namespaces; ca-certificates: TLS to the API server.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY target/release/weftctl target/release/node-proxy target/release/waypoint \
     target/release/weft-cni /usr/local/bin/

# The controller runs as this user (the manifests set it too); node-proxy and the CNI
# installer run as root with only the capabilities they need.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weftctl"]
