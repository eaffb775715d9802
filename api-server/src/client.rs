//! A blocking client of the API socket, for the scheduler agent, tools and tests. One
//! keep-alive connection, reopened when the server has closed it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::models::{
    ActionType, BootSource, DeviceUpgrade, Drive, InstanceActionInfo, InstanceInfo, Logger,
    MachineConfig, MachineConfigUpdate, Metrics, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SkiffDevices, SkiffVmState, SnapshotCreateParams, SnapshotLoadParams,
    UpgradeReport, UpgradeReports, Version, Vm, VmStateChange, VmUpgrade, VmmUpgrade,
    VmmUpgradeReport,
};

/// Largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 << 10;
/// Largest response body accepted.
const MAX_BODY: usize = 64 << 20;
/// How often [`wait_ready`] retries.
const POLL: Duration = Duration::from_millis(10);
/// Default of [`ApiClient::slow_timeout`]: an upgrade starts and negotiates a new device
/// process per device, which can take seconds on a slow host.
pub const SLOW_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket does not accept connections.
    #[error("cannot connect to the API socket {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket did not accept a connection in time.
    #[error("the API socket {socket} did not accept a connection within {waited:?}")]
    NotReady {
        /// The socket.
        socket: PathBuf,
        /// How long we tried.
        waited: Duration,
    },
    /// Reading or writing the connection failed.
    #[error("I/O error on the API socket {socket}")]
    Io {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server's answer is not HTTP we understand.
    #[error("malformed response on the API socket {socket}: {detail}")]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A method or path that cannot go on a request line.
    #[error("invalid request {0:?}")]
    InvalidRequest(String),
    /// The server answered with an error status.
    #[error("API error {status}: {message}")]
    Fault {
        /// HTTP status.
        status: u16,
        /// The `fault_message` (or the body, if it had none).
        message: String,
    },
    /// A request body could not be encoded or a response body decoded.
    #[error("cannot {action} JSON for {path}")]
    Json {
        /// "encode" or "decode".
        action: &'static str,
        /// The request's path.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// An HTTP response as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The `fault_message` of an error body, if it has one.
    pub fn fault_message(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get("fault_message")?.as_str().map(str::to_owned)
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Waits until the socket at `socket` accepts a connection, or `timeout` passes.
pub fn wait_ready(socket: &Path, timeout: Duration) -> Result<(), ClientError> {
    connect_within(socket, timeout).map(drop)
}

fn connect_within(socket: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(_) if start.elapsed() < timeout => thread::sleep(POLL),
            Err(_) => {
                return Err(ClientError::NotReady {
                    socket: socket.to_owned(),
                    waited: start.elapsed(),
                })
            }
        }
    }
}

/// A blocking client of one API socket.
#[derive(Debug)]
pub struct ApiClient {
    socket: PathBuf,
    conn: Option<Conn>,
    timeout: Option<Duration>,
    slow_timeout: Duration,
}

/// Why one exchange failed.
enum Failure {
    /// A reused connection turned out closed before any answer: safe to resend.
    Stale,
    /// Anything else.
    Fatal(ClientError),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Fatal(e)
    }
}

impl ApiClient {
    /// A client of the socket at `socket`; it connects on the first request.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
            conn: None,
            timeout: None,
            slow_timeout: SLOW_TIMEOUT,
        }
    }

    /// Waits up to `timeout` for the socket to accept, and returns a connected client.
    pub fn connect_timeout(
        socket: impl Into<PathBuf>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let mut client = Self::new(socket);
        let stream = connect_within(&client.socket, timeout)?;
        client.conn = Some(Conn::new(stream));
        Ok(client)
    }

    /// Bounds every read and write of a request by `timeout` (default: none).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self.conn = None;
        self
    }

    /// The least bound on the slow requests (the device upgrades), whatever
    /// [`with_timeout`](Self::with_timeout) says: they wait max(timeout, `slow`)
    /// (default [`SLOW_TIMEOUT`]). Without a timeout they are not bounded either.
    pub fn with_slow_timeout(mut self, slow: Duration) -> Self {
        self.slow_timeout = slow;
        self
    }

    /// The bound on each read and write of a request, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The bound on each read and write of a slow request (an upgrade), if any.
    pub fn slow_timeout(&self) -> Option<Duration> {
        self.timeout.map(|t| t.max(self.slow_timeout))
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the response whatever its status. `body`, when
    /// given, is sent as `application/json`.
    pub fn raw(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<RawResponse, ClientError> {
        let bad = |s: &str| s.is_empty() || s.bytes().any(|b| b <= b' ' || b == 0x7f);
        if bad(method) || bad(path) {
            return Err(ClientError::InvalidRequest(format!("{method} {path}")));
        }
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        request.push_str("Accept: application/json\r\n");
        if let Some(b) = body {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());

        let reused = self.conn.is_some();
        let first = self.exchange(&bytes);
        let result = match first {
            Err(Failure::Stale) if reused => self.exchange(&bytes),
            other => other,
        };
        result.map_err(|f| {
            self.conn = None;
            match f {
                Failure::Fatal(e) => e,
                Failure::Stale => self.protocol("connection closed before a response"),
            }
        })
    }

    fn exchange(&mut self, request: &[u8]) -> Result<RawResponse, Failure> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let stream =
                    UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                        socket: self.socket.clone(),
                        source,
                    })?;
                Conn::new(stream)
            }
        };
        let mut conn = conn;
        let io_err = |source| ClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        conn.stream
            .set_read_timeout(self.timeout)
            .and_then(|()| conn.stream.set_write_timeout(self.timeout))
            .map_err(io_err)?;
        if let Err(e) = conn.stream.write_all(request) {
            return match e.kind() {
                // The server may have answered and closed before taking the whole request
                // (a refused body): that answer is the response. Nothing at all means a
                // stale connection.
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    match conn.read_response(&self.socket) {
                        Ok((response, _)) => Ok(response),
                        Err(_) => Err(Failure::Stale),
                    }
                }
                _ => Err(io_err(e).into()),
            };
        }
        let (response, keep) = conn.read_response(&self.socket)?;
        if keep {
            self.conn = Some(conn);
        }
        Ok(response)
    }

    fn protocol(&self, detail: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            detail: detail.into(),
        }
    }

    /// A request whose non-2xx answer becomes [`ClientError::Fault`].
    fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<RawResponse, ClientError> {
        let r = self.raw(method, path, body)?;
        if r.is_success() {
            return Ok(r);
        }
        let message = r.fault_message().unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&r.body).trim().to_owned();
            if text.is_empty() {
                format!("HTTP status {}", r.status)
            } else {
                text
            }
        });
        Err(ClientError::Fault {
            status: r.status,
            message,
        })
    }

    fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        let r = self.call("GET", path, None)?;
        serde_json::from_slice(&r.body).map_err(|source| ClientError::Json {
            action: "decode",
            path: path.to_owned(),
            source,
        })
    }

    fn send<T: Serialize>(
        &mut self,
        method: &str,
        path: &str,
        body: &T,
    ) -> Result<(), ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|source| ClientError::Json {
            action: "encode",
            path: path.to_owned(),
            source,
        })?;
        self.call(method, path, Some(&bytes)).map(drop)
    }

    /// A request with a JSON body and a JSON answer, bounded by
    /// [`slow_timeout`](Self::slow_timeout) instead of the usual timeout.
    fn send_slow<T: Serialize, R: DeserializeOwned>(
        &mut self,
        method: &str,
        path: &str,
        body: &T,
    ) -> Result<R, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|source| ClientError::Json {
            action: "encode",
            path: path.to_owned(),
            source,
        })?;
        let usual = self.timeout;
        self.timeout = self.slow_timeout();
        let r = self.call(method, path, Some(&bytes));
        self.timeout = usual;
        serde_json::from_slice(&r?.body).map_err(|source| ClientError::Json {
            action: "decode",
            path: path.to_owned(),
            source,
        })
    }

    /// `GET /`.
    pub fn instance_info(&mut self) -> Result<InstanceInfo, ClientError> {
        self.get("/")
    }

    /// `GET /version`.
    pub fn version(&mut self) -> Result<Version, ClientError> {
        self.get("/version")
    }

    /// `GET /machine-config`.
    pub fn machine_config(&mut self) -> Result<MachineConfig, ClientError> {
        self.get("/machine-config")
    }

    /// `PUT /machine-config`.
    pub fn put_machine_config(&mut self, config: &MachineConfig) -> Result<(), ClientError> {
        self.send("PUT", "/machine-config", config)
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine_config(
        &mut self,
        update: &MachineConfigUpdate,
    ) -> Result<(), ClientError> {
        self.send("PATCH", "/machine-config", update)
    }

    /// `PUT /boot-source`.
    pub fn put_boot_source(&mut self, boot: &BootSource) -> Result<(), ClientError> {
        self.send("PUT", "/boot-source", boot)
    }

    /// `PUT /drives/{drive_id}`.
    pub fn put_drive(&mut self, drive: &Drive) -> Result<(), ClientError> {
        self.send(
            "PUT",
            &format!("/drives/{}", escape(&drive.drive_id)),
            drive,
        )
    }

    /// `PATCH /drives/{drive_id}`.
    pub fn patch_drive(&mut self, drive: &PartialDrive) -> Result<(), ClientError> {
        self.send(
            "PATCH",
            &format!("/drives/{}", escape(&drive.drive_id)),
            drive,
        )
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub fn put_network_interface(&mut self, iface: &NetworkInterface) -> Result<(), ClientError> {
        let path = format!("/network-interfaces/{}", escape(&iface.iface_id));
        self.send("PUT", &path, iface)
    }

    /// `PATCH /network-interfaces/{iface_id}`.
    pub fn patch_network_interface(
        &mut self,
        iface: &PartialNetworkInterface,
    ) -> Result<(), ClientError> {
        let path = format!("/network-interfaces/{}", escape(&iface.iface_id));
        self.send("PATCH", &path, iface)
    }

    /// `PUT /actions`.
    pub fn action(&mut self, action_type: ActionType) -> Result<(), ClientError> {
        self.send("PUT", "/actions", &InstanceActionInfo { action_type })
    }

    /// `PATCH /vm`.
    pub fn patch_vm(&mut self, state: VmStateChange) -> Result<(), ClientError> {
        self.send("PATCH", "/vm", &Vm { state })
    }

    /// `GET /vm/config`: the whole configuration, as a Firecracker config file.
    pub fn vm_config(&mut self) -> Result<serde_json::Value, ClientError> {
        self.get("/vm/config")
    }

    /// `PUT /logger`.
    pub fn put_logger(&mut self, logger: &Logger) -> Result<(), ClientError> {
        self.send("PUT", "/logger", logger)
    }

    /// `PUT /metrics`.
    pub fn put_metrics(&mut self, metrics: &Metrics) -> Result<(), ClientError> {
        self.send("PUT", "/metrics", metrics)
    }

    /// `GET /skiff/vm`.
    pub fn skiff_vm(&mut self) -> Result<SkiffVmState, ClientError> {
        self.get("/skiff/vm")
    }

    /// `GET /skiff/devices`.
    pub fn skiff_devices(&mut self) -> Result<SkiffDevices, ClientError> {
        self.get("/skiff/devices")
    }

    /// `PUT /skiff/devices/{id}/upgrade`: replaces the device's process by one of `binary`
    /// (default: the binary it runs now) while the guest runs. Waits up to
    /// [`slow_timeout`](Self::slow_timeout).
    pub fn upgrade_device(
        &mut self,
        id: &str,
        binary: Option<&str>,
    ) -> Result<UpgradeReport, ClientError> {
        let path = format!("/skiff/devices/{}/upgrade", escape(id));
        let body = DeviceUpgrade {
            binary: binary.map(str::to_owned),
        };
        self.send_slow("PUT", &path, &body)
    }

    /// `PUT /skiff/upgrade`: replaces the process of every device, one after the other.
    /// Waits up to [`slow_timeout`](Self::slow_timeout).
    pub fn upgrade_all(&mut self, upgrade: &VmUpgrade) -> Result<UpgradeReports, ClientError> {
        self.send_slow("PUT", "/skiff/upgrade", upgrade)
    }

    /// `PUT /skiff/power-button`: presses the guest's ACPI power button.
    pub fn power_button(&mut self) -> Result<(), ClientError> {
        self.send("PUT", "/skiff/power-button", &serde_json::json!({}))
    }

    /// `PUT /skiff/vmm/upgrade`: a new VMM process (of `binary`, default the running one)
    /// takes the guest over. Waits up to [`slow_timeout`](Self::slow_timeout).
    pub fn upgrade_vmm(&mut self, binary: Option<&str>) -> Result<VmmUpgradeReport, ClientError> {
        let body = VmmUpgrade {
            binary: binary.map(str::to_owned),
        };
        self.send_slow("PUT", "/skiff/vmm/upgrade", &body)
    }

    /// `PUT /snapshot/create`: the paused VM's state and memory to files. Waits up to
    /// [`slow_timeout`](Self::slow_timeout).
    pub fn create_snapshot(&mut self, params: &SnapshotCreateParams) -> Result<(), ClientError> {
        let usual = self.timeout;
        self.timeout = self.slow_timeout();
        let r = self.send("PUT", "/snapshot/create", params);
        self.timeout = usual;
        r
    }

    /// `PUT /snapshot/load`: a VM from a snapshot, in a skiff that has not started one.
    /// Waits up to [`slow_timeout`](Self::slow_timeout).
    pub fn load_snapshot(&mut self, params: &SnapshotLoadParams) -> Result<(), ClientError> {
        let usual = self.timeout;
        self.timeout = self.slow_timeout();
        let r = self.send("PUT", "/snapshot/load", params);
        self.timeout = usual;
        r
    }

    /// `GET /skiff/metrics` (Prometheus text).
    pub fn skiff_metrics(&mut self) -> Result<String, ClientError> {
        let r = self.call("GET", "/skiff/metrics", None)?;
        String::from_utf8(r.body).map_err(|_| self.protocol("metrics are not UTF-8"))
    }
}

/// Percent-encodes an id for a path segment, so that no id can change the request line
/// (the server then rejects ids outside `[A-Za-z0-9_]`).
fn escape(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"_-.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One connection and the bytes read from it but not consumed yet.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// A parsed response head.
struct Head {
    status: u16,
    content_type: Option<String>,
    length: Option<usize>,
    chunked: bool,
    close: bool,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more bytes into `buf`; false at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one response; the flag says whether the connection can be reused.
    fn read_response(&mut self, socket: &Path) -> Result<(RawResponse, bool), Failure> {
        let protocol = |detail: String| {
            Failure::Fatal(ClientError::Protocol {
                socket: socket.to_owned(),
                detail,
            })
        };
        let io_err = |source| {
            Failure::Fatal(ClientError::Io {
                socket: socket.to_owned(),
                source,
            })
        };
        let mut got_any = false;
        let head = loop {
            match self.parse_head().map_err(|e| protocol(e.to_string()))? {
                Some(h) if (100..200).contains(&h.status) => continue,
                Some(h) => break h,
                None if self.buf.len() > MAX_HEAD => {
                    return Err(protocol("response head too large".into()))
                }
                None => {}
            }
            match self.fill() {
                Ok(true) => got_any = true,
                Ok(false) if !got_any && self.buf.is_empty() => return Err(Failure::Stale),
                Ok(false) => return Err(protocol("connection closed mid-response".into())),
                Err(e) if !got_any && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(Failure::Stale)
                }
                Err(e) => return Err(io_err(e)),
            }
        };
        let mut keep = !head.close;
        let body = if head.status == 204 || head.status == 304 {
            Vec::new()
        } else if head.chunked {
            self.read_chunked().map_err(|e| match e {
                Chunked::Io(e) => io_err(e),
                Chunked::Bad(d) => protocol(d),
            })?
        } else if let Some(n) = head.length {
            if n > MAX_BODY {
                return Err(protocol(format!("response body of {n} bytes")));
            }
            self.take(n).map_err(io_err)?
        } else {
            keep = false;
            while self.fill().map_err(io_err)? {
                if self.buf.len() > MAX_BODY {
                    return Err(protocol("response body too large".into()));
                }
            }
            std::mem::take(&mut self.buf)
        };
        let response = RawResponse {
            status: head.status,
            content_type: head.content_type,
            body,
        };
        Ok((response, keep))
    }

    /// Parses and consumes a complete head in `buf`; `None` if more bytes are needed.
    fn parse_head(&mut self) -> Result<Option<Head>, httparse::Error> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let used = match resp.parse(&self.buf)? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => return Ok(None),
        };
        let mut head = Head {
            status: resp.code.unwrap_or_default(),
            content_type: None,
            length: None,
            chunked: false,
            close: resp.version == Some(0),
        };
        for h in resp.headers.iter() {
            let value = String::from_utf8_lossy(h.value).trim().to_owned();
            let lower = value.to_ascii_lowercase();
            if h.name.eq_ignore_ascii_case("content-type") {
                head.content_type = Some(value);
            } else if h.name.eq_ignore_ascii_case("content-length") {
                head.length = value.parse().ok();
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = lower.contains("chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                head.close =
                    lower.contains("close") || (head.close && !lower.contains("keep-alive"));
            }
        }
        self.buf.drain(..used);
        Ok(Some(head))
    }

    /// Takes exactly `n` bytes.
    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Takes one CRLF-terminated line, without the CRLF.
    fn line(&mut self) -> Result<String, Chunked> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Chunked::Bad("chunk line too long".into()));
            }
            if !self.fill().map_err(Chunked::Io)? {
                return Err(Chunked::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, Chunked> {
        let mut body = Vec::new();
        loop {
            let line = self.line()?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| Chunked::Bad(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                while !self.line()?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > MAX_BODY {
                return Err(Chunked::Bad("response body too large".into()));
            }
            body.extend(self.take(size).map_err(Chunked::Io)?);
            if !self.line()?.is_empty() {
                return Err(Chunked::Bad("chunk not followed by CRLF".into()));
            }
        }
    }
}

/// Why a chunked body could not be read.
enum Chunked {
    Io(io::Error),
    Bad(String),
}

#[cfg(test)]
mod tests;
