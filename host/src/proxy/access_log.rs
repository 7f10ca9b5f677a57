//! The proxy's access log: the recent requests of each container, kept in memory (a
//! bounded ring per container), for the API now and the `logs` kit service later. An
//! entry is written when its response body ends (or is dropped), so `bytes` and
//! `duration_ms` cover the whole response, not just its head.

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

/// Entries kept per container; older ones fall off.
pub const PER_CONTAINER: usize = 1000;

/// Kept as the proxy saw it and formatted when read: the proxy's hot path formats
/// nothing.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When the request arrived (RFC 3339 when serialized).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    #[serde(serialize_with = "method_str")]
    pub method: hyper::Method,
    pub host: String,
    pub path: String,
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    pub duration_ms: f64,
    pub client: IpAddr,
    /// The service label (`files-1`, `http-8000`) the request was for.
    pub service: String,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let t = time::OffsetDateTime::from(*t);
    s.serialize_str(
        &t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    )
}

fn method_str<S: serde::Serializer>(m: &hyper::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

#[derive(Default)]
pub struct AccessLog {
    by_container: Mutex<HashMap<String, VecDeque<Entry>>>,
}

impl AccessLog {
    pub fn record(&self, container_id: &str, e: Entry) {
        let mut map = self.by_container.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up before inserted: the key is allocated once per container, not per
        // request.
        if !map.contains_key(container_id) {
            map.insert(container_id.to_string(), VecDeque::new());
        }
        let Some(ring) = map.get_mut(container_id) else {
            return; // just inserted, under the same lock
        };
        if ring.len() >= PER_CONTAINER {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    /// The newest `limit` entries of a container, oldest first.
    pub fn recent(&self, container_id: &str, limit: usize) -> Vec<Entry> {
        let map = self.by_container.lock().unwrap_or_else(|p| p.into_inner());
        map.get(container_id)
            .map(|r| {
                r.iter()
                    .skip(r.len().saturating_sub(limit))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops a deleted container's entries.
    pub fn forget(&self, container_id: &str) {
        self.by_container
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(container_id);
    }
}

/// An entry waiting for its response to finish.
pub struct Pending {
    pub log: Arc<AccessLog>,
    pub container_id: String,
    pub started: Instant,
    pub entry: Entry,
}

/// A response body that counts what it sends and writes the log entry at its end.
pub struct Logged<B> {
    inner: B,
    pending: Option<Pending>,
    bytes: u64,
}

impl<B> Logged<B> {
    pub fn new(inner: B, pending: Pending) -> Self {
        Logged {
            inner,
            pending: Some(pending),
            bytes: 0,
        }
    }

    fn finish(&mut self) {
        if let Some(mut p) = self.pending.take() {
            p.entry.bytes = self.bytes;
            p.entry.duration_ms = (p.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
            p.log.record(&p.container_id, p.entry);
        }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> http_body::Body for Logged<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn entry(path: &str) -> Entry {
        Entry {
            time: SystemTime::now(),
            method: hyper::Method::GET,
            host: "h".into(),
            path: path.into(),
            status: 200,
            bytes: 0,
            duration_ms: 0.0,
            client: IpAddr::from([127, 0, 0, 1]),
            service: "files-1".into(),
        }
    }

    #[test]
    fn rings_are_bounded_and_per_container() {
        let log = AccessLog::default();
        for i in 0..PER_CONTAINER + 5 {
            log.record("a", entry(&format!("/{i}")));
        }
        log.record("b", entry("/b"));
        let a = log.recent("a", usize::MAX);
        assert_eq!(a.len(), PER_CONTAINER);
        assert_eq!(a[0].path, "/5", "the oldest fell off");
        assert_eq!(
            log.recent("a", 2).last().unwrap().path,
            format!("/{}", PER_CONTAINER + 4)
        );
        assert_eq!(log.recent("b", 10).len(), 1);
        log.forget("a");
        assert!(log.recent("a", 10).is_empty());
    }

    #[tokio::test]
    async fn the_entry_counts_the_body_and_is_written_at_its_end() {
        let log = Arc::new(AccessLog::default());
        let body = http_body_util::Full::new(Bytes::from_static(b"hello world"));
        let logged = Logged::new(
            body,
            Pending {
                log: log.clone(),
                container_id: "c".into(),
                started: Instant::now(),
                entry: entry("/x"),
            },
        );
        assert!(log.recent("c", 10).is_empty(), "not before the body ends");
        let bytes = logged.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello world");
        let e = log.recent("c", 10);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].bytes, 11);
        let json = serde_json::to_value(&e[0]).unwrap();
        assert_eq!(json["method"], "GET");
        assert_eq!(json["client"], "127.0.0.1");
        let time = json["time"].as_str().unwrap();
        let fmt = &time::format_description::well_known::Rfc3339;
        assert!(time::OffsetDateTime::parse(time, fmt).is_ok(), "{time}");
    }
}
