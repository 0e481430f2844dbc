//! IPv6 end to end: a dual-stack sandbox (IPv4 and IPv6 on every pod, IPv4 the primary)
//! and an IPv6-only one. A pod's IPv6 connections are captured like its IPv4 ones: over
//! mTLS on the wire, under the same policies, with the client's address kept.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::path::PathBuf;
use std::time::Duration;

use weft_e2e::{
    capture_fabric, eventually, metric_sum, repo_root, server_hellos, Sandbox, TempManifests,
    DENY_CLIENT,
};

fn mesh() -> PathBuf {
    repo_root().join("tests/manifests/mesh")
}

const A: &str = "shop/client";
const B: &str = "shop/echo";

/// A service of both families in front of B, beside the manifests' IPv4-only one.
const DUAL_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: echo-dual, namespace: shop}
spec:
  ipFamilyPolicy: RequireDualStack
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

/// Node 2 counted an inbound mTLS connection from A's principal.
fn inbound_from_client(sb: &Sandbox) -> f64 {
    sb.inbound_mtls("node-2", "spiffe://cluster.local/ns/shop/sa/client", "echo")
}

#[test]
#[ignore = "needs root"]
fn dual_stack_ipv6_goes_over_mtls_keeps_the_client_and_obeys_policy() {
    let manifests = TempManifests::copy(&mesh()).unwrap();
    manifests.write("60-dual.yaml", DUAL_SERVICE).unwrap();
    let sb = Sandbox::up_with("e2e-dual", manifests.path(), &["--ip-family", "dual"]).unwrap();
    let (a4, b4) = (sb.ip(A).unwrap(), sb.ip(B).unwrap());
    let (a6, b6) = (sb.ip6(A).unwrap(), sb.ip6(B).unwrap());
    assert!(!a4.contains(':'), "IPv4 is the primary family: {a4}");

    // On the wire: TLS 1.3 to 15008 over IPv6, and none of the request in plaintext.
    let pcap = sb.state_dir.join("fabric6.pcap");
    let web6 = sb.ip6("legacy/web").unwrap();
    let tcpdump = capture_fabric(&sb, "ip6 and tcp", &pcap, || {
        let _ = sb.curl(A, &format!("http://[{web6}]:8080/warm-up"));
    })
    .unwrap();
    let marker = "ipv6-plaintext-must-not-appear-on-the-wire";
    let (code, body) = sb.curl(A, &format!("http://[{b6}]:8080/{marker}")).unwrap();
    assert_eq!(code, 0, "curl over IPv6 by pod IP: {body}");
    assert!(body.contains("\"pod\":\"echo\""), "{body}");
    tcpdump.stop();
    let bytes = std::fs::read(&pcap).unwrap();
    assert!(
        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the request's plaintext crossed the fabric"
    );
    let text = server_hellos(
        &pcap,
        &[
            "ipv6.src",
            "tcp.srcport",
            "tls.handshake.extensions.supported_version",
        ],
    )
    .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("{b6}\t15008")) && l.contains("0x0304")),
        "a ServerHello from [{b6}]:15008 negotiating TLS 1.3: {text:?}"
    );

    // By the dual-stack service's IPv6 address, and by its IPv4 one.
    let vips = sb.vips("shop/echo-dual").unwrap();
    assert_eq!(vips.len(), 2, "{vips:?}");
    let (code, body) = sb
        .curl(A, &format!("http://[{}]/by-vip6", vips[1]))
        .unwrap();
    assert_eq!(code, 0, "curl by the service's IPv6 address: {body}");
    let (code, body) = sb.curl(A, &format!("http://{}/by-vip4", vips[0])).unwrap();
    assert_eq!(code, 0, "curl by the service's IPv4 address: {body}");
    let (code, body) = sb.curl(A, &format!("http://{b4}:8080/by-ip4")).unwrap();
    assert_eq!(code, 0, "IPv4 is served as before: {body}");

    // B saw A's own address, in the family A used.
    let log = sb.log(B).unwrap();
    for (path, client) in [
        (format!("/{marker}"), format!("client=[{a6}]:")),
        ("/by-vip6".to_owned(), format!("client=[{a6}]:")),
        ("/by-vip4".to_owned(), format!("client={a4}:")),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(&client) && l.contains(&format!("path={path} "))),
            "echo's log shows {client} as the source of {path}:\n{log}"
        );
    }
    assert!(
        inbound_from_client(&sb) >= 4.0,
        "node-2 counted A's connections with its principal"
    );

    // A pod outside the mesh reaches B over IPv6 in plaintext (permissive), but not the
    // STRICT pod.
    let (code, body) = sb
        .curl("legacy/outsider", &format!("http://[{b6}]:8080/outsider"))
        .unwrap();
    assert_eq!(code, 0, "{body}");
    let vault6 = sb.ip6("vault/secrets").unwrap();
    let (code, body) = sb
        .curl("legacy/outsider", &format!("http://[{vault6}]:8080/"))
        .unwrap();
    assert_ne!(code, 0, "STRICT refuses plaintext over IPv6 too: {body}");

    // A DENY policy applies to IPv6 connections as to IPv4 ones.
    manifests.write("50-deny.yaml", DENY_CLIENT).unwrap();
    let denials = |sb: &Sandbox| {
        metric_sum(
            &sb.metrics("node-2").unwrap_or_default(),
            "weft_authorization_denials_total",
            &[
                ("policy", "shop/deny-client"),
                ("reason", "deny_policy"),
                ("when", "connect"),
            ],
        )
    };
    let denied = eventually(Duration::from_secs(10), || {
        let (code, _) = sb.curl(A, &format!("http://[{b6}]:8080/denied")).ok()?;
        (code != 0 && denials(&sb) >= 1.0).then_some(())
    });
    assert!(
        denied.is_some(),
        "A's IPv6 connections are refused by the policy once it applies"
    );
    let (code, body) = sb.curl(A, &format!("http://[{b6}]:8080/denied")).unwrap();
    assert_ne!(code, 0, "and stay refused: {body}");
    let (code, body) = sb
        .curl("shop/admin", &format!("http://[{b6}]:8080/admin"))
        .unwrap();
    assert_eq!(code, 0, "others are not: {body}");
    let log = sb.node_log("node-2");
    assert!(
        log.lines()
            .any(|l| l.contains("connection denied") && l.contains(&a6)),
        "the refusal is logged with A's IPv6 address:\n{log}"
    );
}

#[test]
#[ignore = "needs root"]
fn ipv6_only_pods_services_and_probes() {
    let manifests = TempManifests::copy(&mesh()).unwrap();
    // The manifests' service has an IPv4 cluster IP, which an IPv6-only cluster refuses;
    // and the STRICT pod gets a readiness probe, which only the node's exemption lets in.
    let pods = std::fs::read_to_string(mesh().join("pods.yaml")).unwrap();
    let probed = r#"command: ["weftctl", "echo", "--port", "8080"], readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 1}}]"#;
    let edited = pods
        .replace("clusterIP: 10.96.0.10", "clusterIP: fd00:10:96::10")
        .replacen(
            r#"command: ["weftctl", "echo", "--port", "8080"]}]"#,
            probed,
            1,
        );
    assert!(edited.contains(probed) && edited.contains("fd00:10:96::10"));
    manifests.write("pods.yaml", &edited).unwrap();
    let sb = Sandbox::up_with("e2e-ipv6", manifests.path(), &["--ip-family", "ipv6"]).unwrap();
    let (a_ip, b_ip) = (sb.ip(A).unwrap(), sb.ip(B).unwrap());
    assert!(a_ip.contains(':') && b_ip.contains(':'), "{a_ip} {b_ip}");

    let (code, body) = sb.curl(A, &format!("http://[{b_ip}]:8080/by-ip")).unwrap();
    assert_eq!(code, 0, "curl by pod IP: {body}");
    let (code, body) = sb.curl(A, "http://[fd00:10:96::10]/by-vip").unwrap();
    assert_eq!(code, 0, "curl by service VIP: {body}");
    let (code, body) = sb.curl(A, "http://echo.shop/by-name").unwrap();
    assert_eq!(code, 0, "curl by service name: {body}");
    let log = sb.log(B).unwrap();
    for path in ["/by-ip", "/by-vip", "/by-name"] {
        assert!(
            log.lines().any(|l| l.contains(&format!("client=[{a_ip}]:"))
                && l.contains(&format!("path={path} "))),
            "echo's log shows {a_ip} as the source of {path}:\n{log}"
        );
    }
    assert!(
        inbound_from_client(&sb) >= 3.0,
        "node-2 counted A's connections with its principal"
    );

    // The kubelet's probes reach the STRICT pod (from the node's IPv6 probe source),
    // while plaintext from a pod is refused.
    let secrets = eventually(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(sb.state_dir.join("state.json")).ok()?;
        let state: serde_json::Value = serde_json::from_str(&text).ok()?;
        state["pods"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "secrets")
            .filter(|p| p["ready"] == true)
            .cloned()
    });
    assert!(secrets.is_some(), "the STRICT pod's readiness probe passes");
    let vault = sb.ip("vault/secrets").unwrap();
    let (code, body) = sb
        .curl("legacy/outsider", &format!("http://[{vault}]:8080/"))
        .unwrap();
    assert_ne!(code, 0, "STRICT refuses plaintext: {body}");
    let (code, body) = sb.curl(A, &format!("http://[{vault}]:8080/")).unwrap();
    assert_eq!(code, 0, "a meshed client reaches it over mTLS: {body}");
}
