//! Test helpers shared by the modules' tests.

use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;

/// A scripted API server: `answer(path, query)` gives each request's status code and
/// JSON body.
pub fn api_server(answer: impl Fn(&str, &str) -> (u16, Value) + Send + 'static) -> kube::Client {
    use http_body_util::{combinators::UnsyncBoxBody, Full};
    type Body = UnsyncBoxBody<Bytes, std::io::Error>;
    let (service, mut handle) =
        tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let (code, body) = answer(&path, &query);
            let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
            let mut response = http::Response::new(
                Full::new(bytes)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *response.status_mut() =
                http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
            send.send_response(response);
        }
    });
    kube::Client::new(service, "default")
}

/// The API server's 404 body.
pub fn not_found() -> (u16, Value) {
    (
        404,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404}),
    )
}
