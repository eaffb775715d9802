//! Lock-free counters of API requests by route and status, written by the API thread and
//! read by whoever renders metrics (the VMM's `GET /skiff/metrics`, the metrics file).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::router::ROUTES;

/// The statuses counted in a bucket of their own; any other status counts under
/// [`OTHER_STATUS`].
pub const STATUS_BUCKETS: [u16; 9] = [200, 204, 400, 404, 405, 408, 413, 500, 503];

/// The `status` of an [`ApiCount`] that sums every status not in [`STATUS_BUCKETS`].
pub const OTHER_STATUS: u16 = 0;

/// The `name` of an [`ApiCount`] for requests that matched no route (404, unsupported
/// endpoints, unparsable requests); its `method` and `path` are `"*"`.
pub const UNROUTED: &str = "unrouted";

const STATUSES: usize = STATUS_BUCKETS.len() + 1;
const ROUTE_SLOTS: usize = ROUTES.len() + 1;

/// Requests answered, by route and status.
#[derive(Debug)]
pub struct ApiMetrics {
    /// `[route index, or ROUTES.len() for unrouted][status bucket]`.
    counts: [[AtomicU64; STATUSES]; ROUTE_SLOTS],
}

/// One non-zero counter of [`ApiMetrics::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCount {
    /// The route's method (`"*"` when unrouted).
    pub method: &'static str,
    /// The route's path pattern (`"*"` when unrouted).
    pub path: &'static str,
    /// The route's name, or [`UNROUTED`].
    pub name: &'static str,
    /// The status answered, or [`OTHER_STATUS`].
    pub status: u16,
    /// How many requests.
    pub count: u64,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            counts: [const { [const { AtomicU64::new(0) }; STATUSES] }; ROUTE_SLOTS],
        }
    }
}

impl ApiMetrics {
    /// All counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one answered request. `route` is an index into [`ROUTES`]; `None` (or an
    /// index out of range) counts as unrouted.
    pub fn record(&self, route: Option<usize>, status: u16) {
        let slot = route.filter(|&i| i < ROUTES.len()).unwrap_or(ROUTES.len());
        let bucket = STATUS_BUCKETS
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUS_BUCKETS.len());
        self.counts[slot][bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The non-zero counters, in route order then status order, unrouted last.
    pub fn snapshot(&self) -> Vec<ApiCount> {
        let mut out = Vec::new();
        for (slot, row) in self.counts.iter().enumerate() {
            let (method, path, name) = match ROUTES.get(slot) {
                Some(r) => (r.method, r.path, r.name),
                None => ("*", "*", UNROUTED),
            };
            for (bucket, counter) in row.iter().enumerate() {
                let count = counter.load(Ordering::Relaxed);
                if count == 0 {
                    continue;
                }
                let status = STATUS_BUCKETS.get(bucket).copied().unwrap_or(OTHER_STATUS);
                out.push(ApiCount {
                    method,
                    path,
                    name,
                    status,
                    count,
                });
            }
        }
        out
    }

    /// Sum of all counters.
    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .flatten()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Appends the counters in Prometheus text format as
    /// `skiff_api_requests_total{method,path,route,status}` (status `"other"` for
    /// [`OTHER_STATUS`]).
    pub fn write_prometheus(&self, out: &mut String) {
        out.push_str("# HELP skiff_api_requests_total API requests answered.\n");
        out.push_str("# TYPE skiff_api_requests_total counter\n");
        for c in self.snapshot() {
            let status = match c.status {
                OTHER_STATUS => "other".to_owned(),
                s => s.to_string(),
            };
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "skiff_api_requests_total{{method=\"{}\",path=\"{}\",route=\"{}\",status=\"{}\"}} {}",
                c.method, c.path, c.name, status, c.count
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_by_route_and_status() {
        let m = ApiMetrics::new();
        assert!(m.snapshot().is_empty());
        m.record(Some(1), 200);
        m.record(Some(1), 200);
        m.record(Some(1), 418);
        m.record(None, 404);
        m.record(Some(ROUTES.len() + 5), 400);
        let snap = m.snapshot();
        assert_eq!(
            snap[0],
            ApiCount {
                method: "GET",
                path: "/version",
                name: "version",
                status: 200,
                count: 2
            }
        );
        assert_eq!(snap[1].status, OTHER_STATUS);
        assert_eq!(
            (snap[2].name, snap[2].status, snap[2].count),
            (UNROUTED, 400, 1)
        );
        assert_eq!((snap[3].name, snap[3].status), (UNROUTED, 404));
        assert_eq!(snap.len(), 4);
        assert_eq!(m.total(), 5);
        let mut text = String::new();
        m.write_prometheus(&mut text);
        assert!(text.contains(
            "skiff_api_requests_total{method=\"GET\",path=\"/version\",route=\"version\",status=\"200\"} 2\n"
        ));
        assert!(text.contains("status=\"other\"} 1\n"));
    }

    #[test]
    fn concurrent_records_all_count() {
        let m = Arc::new(ApiMetrics::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| m.record(Some(0), 204)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(m.snapshot()[0].count, 4000);
    }
}
