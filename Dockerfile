# Weft's image: weftctl (runs the controller: `weftctl controller`), node-agent (run by
# the node agent DaemonSet; it copies weft-cni, the CNI plugin, onto its node), node-proxy
# (run by the node-proxy DaemonSet) and waypoint (run by each Gateway's Deployment), each
# role's own binary. The manifests are rendered by `weftctl install`; see docs/install.md.
#
# The binaries are built beforehand by scripts/release, as root (stripped, debug
# information kept in target/dist/debug; weft-cni static; node-proxy and the waypoint
# optimised with the profile of a training run in the sandbox), on a glibc no newer than
# the base image's (Debian 12), and copied in; nothing is compiled here:
#
#   scripts/release
#   docker build -t <registry>/weft:<version> .
FROM debian:bookworm-slim

# ca-certificates: TLS to the API server. No nftables or iproute2: the node agent
# programs capture rules over netlink itself.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY target/dist/bin/weftctl target/dist/bin/node-agent target/dist/bin/node-proxy \
     target/dist/bin/waypoint target/dist/bin/weft-cni /usr/local/bin/

# The controller runs as this user (the manifests set it too); the node agent and
# node-proxy run as root with only the capabilities they need.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weftctl"]
