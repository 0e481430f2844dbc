//! Spans: one per request, a child of the caller's W3C trace context (or the root of a
//! new trace), exported over OTLP/gRPC in batches when an endpoint is configured. Off,
//! the waypoint still propagates `traceparent` and logs the trace id.

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// The waypoint's tracer; does nothing when no endpoint is configured.
pub struct Tracing {
    inner: Option<(SdkTracerProvider, SdkTracer)>,
}

/// A request's span, or nothing when tracing is off.
pub struct RequestSpan(Option<opentelemetry_sdk::trace::Span>);

/// The caller's trace context, from a valid `traceparent` header.
pub fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId)> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, _flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let trace = TraceId::from_hex(trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    Some((trace, span))
}

impl Tracing {
    /// Exports to `endpoint` (OTLP/gRPC, e.g. `http://collector:4317`), or nothing.
    pub fn new(endpoint: Option<&str>, service: &str) -> anyhow::Result<Self> {
        let Some(endpoint) = endpoint else {
            return Ok(Tracing { inner: None });
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        let batch =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("weft-waypoint");
        Ok(Tracing {
            inner: Some((provider, tracer)),
        })
    }

    /// Starts the span of a request named `name`, under the caller's context if any.
    /// The name is made only when spans are exported.
    pub fn start(
        &self,
        name: impl std::fmt::Display,
        parent: Option<(TraceId, SpanId)>,
    ) -> RequestSpan {
        let Some((_, tracer)) = &self.inner else {
            return RequestSpan(None);
        };
        let cx = match parent {
            Some((trace, span)) => Context::new().with_remote_span_context(SpanContext::new(
                trace,
                span,
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        RequestSpan(Some(
            tracer
                .span_builder(name.to_string())
                .with_kind(SpanKind::Server)
                .start_with_context(tracer, &cx),
        ))
    }

    /// Sends what is batched; called on shutdown. The provider's shutdown blocks its
    /// thread until the batch task has exported, so it runs on a blocking thread: on
    /// the waypoint's one runtime thread it would wait for itself.
    pub async fn shutdown(&self) {
        if let Some((provider, _)) = &self.inner {
            let provider = provider.clone();
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

impl RequestSpan {
    /// The span's trace and span ids, when tracing is on.
    pub fn ids(&self) -> Option<(TraceId, SpanId)> {
        let s = self.0.as_ref()?;
        let cx = s.span_context();
        Some((cx.trace_id(), cx.span_id()))
    }

    /// Ends the span with the request's outcome (made only when spans are exported).
    pub fn end(self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(mut s) = self.0 {
            s.set_attributes(attributes());
            s.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_and_invalid_ones_refused() {
        let (t, s) = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(t.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.to_string(), "00f067aa0ba902b7");
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }
}
