//! skiffctl: a command-line client of skiff's API socket, for people and scripts. One
//! subcommand per endpoint (see `skiffctl --help`); `--json` prints the API's answers as
//! received. Exit status: 0 success, 1 the API answered with an error, 2 usage error,
//! 3 the socket cannot be reached or the exchange failed.

mod cli;
mod render;

use std::io::{self, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api_server::client::{self, ApiClient, ClientError, RawResponse};
use api_server::models::{ActionType, VmStateChange};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

use cli::{Cli, Op, RawBody, SOCKET_ENV};

/// Errors of one skiffctl run.
#[derive(Debug, thiserror::Error)]
enum SkiffctlError {
    /// The request failed (including an error answer from the API).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The body of `raw -` could not be read.
    #[error("cannot read the request body from stdin")]
    Stdin(#[source] io::Error),
    /// Writing the answer failed.
    #[error("cannot write to stdout")]
    Output(#[source] io::Error),
}

impl SkiffctlError {
    fn exit_code(&self) -> u8 {
        match self {
            SkiffctlError::Client(ClientError::Fault { .. }) => 1,
            SkiffctlError::Client(ClientError::InvalidRequest(_)) | SkiffctlError::Stdin(_) => 2,
            _ => 3,
        }
    }
}

/// Where answers go: stdout, with a closed pipe (`skiffctl metrics | head`) not an error.
fn emit(text: &str) -> Result<(), SkiffctlError> {
    let mut out = io::stdout().lock();
    let r = out.write_all(text.as_bytes()).and_then(|()| {
        if text.ends_with('\n') || text.is_empty() {
            Ok(())
        } else {
            out.write_all(b"\n")
        }
    });
    match r.and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(SkiffctlError::Output(e)),
        _ => Ok(()),
    }
}

/// The fault of an error answer, as the typed client reports it.
fn fault(r: &RawResponse) -> ClientError {
    let message = r.fault_message().unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&r.body).trim().to_owned();
        if text.is_empty() {
            format!("HTTP status {}", r.status)
        } else {
            text
        }
    });
    ClientError::Fault {
        status: r.status,
        message,
    }
}

/// A GET whose body is printed as received (`--json`).
fn get_raw(c: &mut ApiClient, path: &str) -> Result<String, SkiffctlError> {
    let r = c.raw("GET", path, None)?;
    if !r.is_success() {
        return Err(fault(&r).into());
    }
    Ok(String::from_utf8_lossy(&r.body).into_owned())
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn run(
    socket: &Path,
    op: Op,
    json: bool,
    timeout: Duration,
) -> Result<Option<String>, SkiffctlError> {
    if op == Op::WaitReady {
        let start = Instant::now();
        client::wait_ready(socket, timeout)?;
        let ms = start.elapsed().as_millis();
        return Ok((!json).then(|| format!("ready after {ms} ms")));
    }
    let mut c = ApiClient::new(socket).with_timeout(timeout);
    if json {
        if let Some(("GET", path)) = op.endpoint() {
            return get_raw(&mut c, path).map(Some);
        }
    }
    let done = |what: String| Ok((!json).then_some(what));
    match op {
        Op::Info => Ok(Some(render::info(&c.instance_info()?))),
        Op::Version => Ok(Some(format!("skiff {}", c.version()?.firecracker_version))),
        Op::GetMachineConfig => Ok(Some(render::machine_config(&c.machine_config()?))),
        Op::PutMachineConfig(m) => {
            c.put_machine_config(&m)?;
            done(format!("machine-config: {}", render::machine_config(&m)))
        }
        Op::PatchMachineConfig(u) => {
            c.patch_machine_config(&u)?;
            done("machine-config updated".into())
        }
        Op::PutBootSource(b) => {
            c.put_boot_source(&b)?;
            done(format!("boot-source: {}", b.kernel_image_path))
        }
        Op::PutDrive(d) => {
            c.put_drive(&d)?;
            done(format!("drive {} configured", d.drive_id))
        }
        Op::PatchDrive(d) => {
            c.patch_drive(&d)?;
            done(format!("drive {} updated", d.drive_id))
        }
        Op::PutNet(n) => {
            c.put_network_interface(&n)?;
            done(format!("network interface {} configured", n.iface_id))
        }
        Op::PatchNet(n) => {
            c.patch_network_interface(&n)?;
            done(format!("network interface {} updated", n.iface_id))
        }
        Op::Action(a) => {
            c.action(a)?;
            done(
                match a {
                    ActionType::InstanceStart => "started",
                    ActionType::SendCtrlAltDel => "Ctrl+Alt+Del sent",
                    ActionType::FlushMetrics => "metrics flushed",
                }
                .into(),
            )
        }
        Op::PowerButton => {
            c.power_button()?;
            done("power button pressed".into())
        }
        Op::PatchVm(s) => {
            c.patch_vm(s)?;
            done(
                match s {
                    VmStateChange::Paused => "paused",
                    VmStateChange::Resumed => "resumed",
                }
                .into(),
            )
        }
        Op::VmConfig => Ok(Some(pretty(&c.vm_config()?))),
        Op::PutLogger(l) => {
            c.put_logger(&l)?;
            done("logger configured".into())
        }
        Op::PutMetrics(m) => {
            c.put_metrics(&m)?;
            done(format!("metrics file: {}", m.metrics_path))
        }
        Op::SkiffVm => Ok(Some(render::vm_state(&c.skiff_vm()?))),
        Op::SkiffDevices => Ok(Some(render::devices(&c.skiff_devices()?))),
        Op::SkiffMetrics => Ok(Some(c.skiff_metrics()?)),
        Op::UpgradeDevice { id, binary } => {
            let r = c.upgrade_device(&id, binary.as_deref())?;
            Ok(Some(if json {
                serde_json::to_string(&r).unwrap_or_default()
            } else {
                render::upgrade(&r)
            }))
        }
        Op::UpgradeAll(u) => {
            let r = c.upgrade_all(&u)?;
            Ok(Some(if json {
                serde_json::to_string(&r).unwrap_or_default()
            } else {
                render::upgrades(&r)
            }))
        }
        Op::UpgradeVmm(u) => {
            let r = c.upgrade_vmm(u.binary.as_deref())?;
            Ok(Some(if json {
                serde_json::to_string(&r).unwrap_or_default()
            } else {
                format!(
                    "VMM upgraded: pid {} -> {} ({}), pause {} us (save {}, restore {}, resume {}), total {} us",
                    r.old_pid,
                    r.new_pid,
                    r.new_binary,
                    r.pause_us,
                    r.save_us,
                    r.restore_us,
                    r.resume_us,
                    r.total_us
                )
            }))
        }
        Op::CreateSnapshot(p) => {
            c.create_snapshot(&p)?;
            done(format!(
                "snapshot written: state {}, memory {}",
                p.snapshot_path, p.mem_file_path
            ))
        }
        Op::LoadSnapshot(p) => {
            c.load_snapshot(&p)?;
            done(format!(
                "snapshot {} loaded ({})",
                p.snapshot_path,
                if p.resume_vm { "running" } else { "paused" }
            ))
        }
        Op::Raw { method, path, body } => {
            let body = match body {
                RawBody::None => None,
                RawBody::Arg(s) => Some(s.into_bytes()),
                RawBody::Stdin => {
                    let mut b = Vec::new();
                    io::stdin()
                        .read_to_end(&mut b)
                        .map_err(SkiffctlError::Stdin)?;
                    Some(b)
                }
            };
            let r = c.raw(&method, &path, body.as_deref())?;
            emit(&String::from_utf8_lossy(&r.body))?;
            if r.is_success() {
                Ok(None)
            } else {
                Err(fault(&r).into())
            }
        }
        Op::WaitReady => Ok(None),
    }
}

/// Prints an error and its causes on one line.
fn report(e: &SkiffctlError) {
    let line = match e {
        SkiffctlError::Client(ClientError::Fault { status, message }) => {
            format!("{status}: {message}")
        }
        e => {
            let mut line = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                line.push_str(&format!(": {c}"));
                cause = c.source();
            }
            line
        }
    };
    eprintln!("skiffctl: {line}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let usage = |msg: String| -> ! { Cli::command().error(ErrorKind::InvalidValue, msg).exit() };
    let socket = match cli
        .socket
        .or_else(|| std::env::var_os(SOCKET_ENV).map(Into::into))
    {
        Some(s) => s,
        None => Cli::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                format!("the API socket is needed: give --socket PATH or set {SOCKET_ENV}"),
            )
            .exit(),
    };
    let timeout = Duration::try_from_secs_f64(cli.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .unwrap_or_else(|| usage(format!("--timeout {}: not a positive number", cli.timeout)));
    let op = cli.command.op().unwrap_or_else(|e| usage(e));
    match run(&socket, op, cli.json, timeout).and_then(|out| out.map_or(Ok(()), |t| emit(&t))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::from(e.exit_code())
        }
    }
}
