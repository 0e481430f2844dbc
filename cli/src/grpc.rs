//! The demo application's gRPC side: `weftctl echo --grpc-port` serves
//! `weft.echo.v1.Echo` (plaintext HTTP/2), `weftctl debug grpc` calls it. Tests use them
//! to send unary and server-streaming calls, and gRPC status codes, through the mesh.

use std::net::SocketAddr;
use std::pin::Pin;

use api::echo_proto::echo_client::EchoClient;
use api::echo_proto::echo_server::{Echo, EchoServer};
use api::echo_proto::{EchoReply, EchoRequest};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

/// Most replies one streaming call asks for.
const MAX_STREAM: u32 = 10_000;

/// The server: who it is, for the replies.
#[derive(Debug, Clone)]
pub struct GrpcEcho {
    /// Pod name.
    pub pod: String,
    /// Version reported.
    pub version: String,
}

impl GrpcEcho {
    fn reply(&self, message: &str, index: u32) -> EchoReply {
        EchoReply {
            message: message.to_owned(),
            pod: self.pod.clone(),
            version: self.version.clone(),
            index,
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for GrpcEcho {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = request.into_inner().message;
        if let Some(code) = message.strip_prefix("fail:") {
            let code = code.parse::<i32>().map(Code::from).unwrap_or(Code::Unknown);
            return Err(Status::new(
                code,
                format!("failed as asked by {:?}", message),
            ));
        }
        Ok(Response::new(self.reply(&message, 0)))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let req = request.into_inner();
        if req.count > MAX_STREAM {
            return Err(Status::invalid_argument(format!(
                "count {} is more than {MAX_STREAM}",
                req.count
            )));
        }
        let this = self.clone();
        let stream = tokio_stream::iter(0..req.count).map(move |i| Ok(this.reply(&req.message, i)));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the Echo service on `addr` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    echo: GrpcEcho,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Both families on an unspecified address, as the HTTP echo.
    let listener = tunnel::net::listen(addr)?;
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(echo))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// One call from `weftctl debug grpc`: unary when `stream` is 0, else server-streaming
/// asking for `stream` replies. Prints one JSON line: the replies' pods, versions and
/// count, or the status code and message.
pub async fn call(to: &str, message: &str, stream: u32) -> anyhow::Result<serde_json::Value> {
    let mut client = EchoClient::connect(to.to_owned()).await?;
    let request = EchoRequest {
        message: message.to_owned(),
        count: stream,
    };
    let result: Result<Vec<EchoReply>, Status> = if stream == 0 {
        client.unary(request).await.map(|r| vec![r.into_inner()])
    } else {
        match client.server_stream(request).await {
            Ok(r) => {
                let mut replies = Vec::new();
                let mut s = r.into_inner();
                let mut failed = None;
                while let Some(item) = s.next().await {
                    match item {
                        Ok(reply) => replies.push(reply),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(replies),
                }
            }
            Err(e) => Err(e),
        }
    };
    Ok(match result {
        Ok(replies) => serde_json::json!({
            "code": 0,
            "replies": replies.len(),
            "pods": replies.iter().map(|r| r.pod.as_str()).collect::<std::collections::BTreeSet<_>>(),
            "versions": replies.iter().map(|r| r.version.as_str()).collect::<std::collections::BTreeSet<_>>(),
            "in_order": replies.iter().enumerate().all(|(i, r)| r.index as usize == i),
        }),
        Err(status) => serde_json::json!({
            "code": status.code() as i32,
            "message": status.message(),
        }),
    })
}

/// `weftctl debug websocket`: opens a WebSocket to `url` (`ws://host[:port]/path`),
/// sends `messages` text messages and reads each echo; the count echoed back intact.
pub async fn websocket(url: &str, messages: u32) -> anyhow::Result<serde_json::Value> {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let uri: http::Uri = url.parse()?;
    let host = uri.host().unwrap_or("localhost").to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let (mut ws, response) = tokio_tungstenite::client_async(url, tcp).await?;
    let mut echoed = 0u32;
    for i in 0..messages {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == text => echoed += 1,
            other => anyhow::bail!("message {i}: expected its echo, got {other:?}"),
        }
    }
    let _ = ws.close(None).await;
    Ok(serde_json::json!({
        "status": response.status().as_u16(),
        "echoed": echoed,
    }))
}
