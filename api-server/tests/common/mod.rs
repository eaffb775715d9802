//! A running API server with a fake VMM behind it, in a private temporary directory.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use api_server::metrics::ApiMetrics;
use api_server::models::{ActionType, MachineConfig, SkiffDevices, SkiffVmState};
use api_server::request::{ApiFault, ApiReply, ApiRequest};
use api_server::server::{ApiCall, ApiServer, ApiServerHandle};
use serde_json::json;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `ApiServer::bind` changes the process umask for a moment: every test that creates
/// files holds this lock so that none is created under the 0177 mask.
pub fn fs_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh private directory.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "skiff-api-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _g = fs_lock();
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("create a temporary directory");
    dir
}

/// Binds with the lock held.
pub fn bind(path: &Path) -> Result<ApiServer, api_server::server::ServerError> {
    let _g = fs_lock();
    ApiServer::bind(path)
}

pub struct Harness {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub metrics: Arc<ApiMetrics>,
    pub wake: EventFd,
    handle: Option<ApiServerHandle>,
    vmm: Option<JoinHandle<()>>,
}

impl Harness {
    /// A server answered by [`fake_vmm`].
    pub fn start(name: &str) -> Harness {
        Self::start_with(name, fake_vmm)
    }

    /// A server answered by `vmm`, which runs on its own thread.
    pub fn start_with(name: &str, vmm: fn(Receiver<ApiCall>)) -> Harness {
        let dir = temp_dir(name);
        let socket = dir.join("api.sock");
        let server = bind(&socket).expect("bind the API socket");
        let (tx, rx) = channel();
        let wake =
            EventFd::new(EFD_NONBLOCK | vmm_sys_util::eventfd::EFD_CLOEXEC).expect("eventfd");
        let metrics = Arc::new(ApiMetrics::new());
        let handle = server
            .spawn(tx, wake.try_clone().expect("dup eventfd"), metrics.clone())
            .expect("start the API thread");
        let vmm = thread::spawn(move || vmm(rx));
        Harness {
            dir,
            socket,
            metrics,
            wake,
            handle: Some(handle),
            vmm: Some(vmm),
        }
    }

    pub fn shutdown(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
        if let Some(v) = self.vmm.take() {
            v.join().expect("fake VMM panicked");
        }
    }

    /// Writes `bytes` on a new connection, half-closes it, and returns what comes back
    /// before the server closes (or 5 s pass).
    pub fn exchange_raw(&self, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set timeout");
        s.write_all(bytes).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Answers like a VMM that keeps only a machine config.
pub fn fake_vmm(rx: Receiver<ApiCall>) {
    let mut machine = MachineConfig::default();
    for call in rx {
        let result = match &call.request {
            ApiRequest::GetInstanceInfo => Ok(ApiReply::Json(json!({
                "app_name": "skiff", "id": "test", "state": "Not started", "vmm_version": "0.1.0"
            }))),
            ApiRequest::GetVersion => {
                Ok(ApiReply::Json(json!({"firecracker_version": "skiff-test"})))
            }
            ApiRequest::GetMachineConfig => Ok(ApiReply::Json(json!(machine))),
            ApiRequest::PutMachineConfig(c) => {
                machine = c.clone();
                Ok(ApiReply::NoContent)
            }
            ApiRequest::PatchMachineConfig(u) => {
                machine = u.apply(&machine);
                Ok(ApiReply::NoContent)
            }
            ApiRequest::GetVmConfig => Ok(ApiReply::Json(json!({"machine-config": machine}))),
            ApiRequest::GetSkiffVm => Ok(ApiReply::Json(json!(SkiffVmState {
                state: "Not started".into(),
                uptime_ms: None,
                paused_ms: 0,
                vcpus: machine.vcpu_count,
                mem_size_mib: machine.mem_size_mib,
                pid: std::process::id(),
            }))),
            ApiRequest::GetSkiffDevices => Ok(ApiReply::Json(json!(SkiffDevices::default()))),
            ApiRequest::GetSkiffMetrics => Ok(ApiReply::Prometheus("skiff_test 1\n".into())),
            ApiRequest::Action(a) if a.action_type == ActionType::SendCtrlAltDel => Err(
                ApiFault::bad_request("SendCtrlAltDel needs a running guest"),
            ),
            _ => Ok(ApiReply::NoContent),
        };
        call.respond(result);
    }
}
