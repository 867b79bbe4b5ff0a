//! Helpers for the end-to-end tests: drive the real lab through `ferrolb-lab`, the pinned
//! `kubectl`, and commands run on the lab's hosts.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// The `ferrolb-lab` binary built beside the test: `$FERROLB_LAB_BIN`, else
/// `target/<profile>/ferrolb-lab` (the test binary lives in `target/<profile>/deps`).
pub fn lab_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERROLB_LAB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p =
        exe.parent().and_then(|d| d.parent()).map(|d| d.join("ferrolb-lab")).context("locating target directory")?;
    if !p.is_file() {
        bail!("{} is not built: run 'cargo build --workspace --bins' first ('make test' does)", p.display());
    }
    Ok(p)
}

/// Runs a command; its output whatever the exit status.
pub fn output(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program).args(args).output().with_context(|| format!("running {program}"))
}

/// Runs a command that must succeed; its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = output(program, args)?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command that must fail with `needle` in its stderr; the stderr.
pub fn fails_with(program: &str, args: &[&str], needle: &str) -> Result<String> {
    let out = output(program, args)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() || !err.contains(needle) {
        bail!("{program} {} should fail saying {needle:?}; it said ({}): {err}", args.join(" "), out.status);
    }
    Ok(err)
}

/// The lab under test.
pub struct Lab {
    pub bin: PathBuf,
}

impl Lab {
    pub fn new() -> Result<Self> {
        Ok(Lab { bin: lab_bin()? })
    }

    pub fn bin(&self) -> &str {
        self.bin.to_str().unwrap_or("ferrolb-lab")
    }

    /// `ferrolb-lab ARGS…`, which must succeed.
    pub fn lab(&self, args: &[&str]) -> Result<String> {
        run(self.bin(), args)
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["kubectl", "--"];
        full.extend_from_slice(args);
        self.lab(&full)
    }

    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut full = args.to_vec();
        full.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&full)?)?)
    }

    /// Applies a manifest given as text.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let path = std::env::temp_dir().join(format!("ferrolb-e2e-{}.yaml", std::process::id()));
        std::fs::write(&path, yaml)?;
        let r = self.kubectl(&["apply", "-f", path.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_file(&path);
        r.map(|_| ())
    }

    /// Runs a command on a lab host (client, node-i) or in any lab namespace.
    pub fn exec(&self, host: &str, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", host];
        full.extend_from_slice(cmd);
        run("ip", &full)
    }

    /// `curl` from a host, with a short timeout; the body.
    pub fn curl(&self, host: &str, url: &str) -> Result<String> {
        self.exec(host, &["curl", "-sS", "--max-time", "3", url])
    }

    /// The pods with a label selector, as JSON items.
    pub fn pods(&self, selector: &str) -> Result<Vec<Value>> {
        let v = self.kubectl_json(&["get", "pods", "-l", selector])?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }
}

/// The directory of the pinned Kubernetes binaries, as `make k8s-bins` reports it.
pub fn k8s_bin_dir() -> Result<PathBuf> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/k8s-bins.sh");
    Ok(PathBuf::from(run("bash", &[script])?.trim()))
}

/// Polls `f` until it returns `Ok(Some(v))`, or fails after `timeout` with the last word.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    wait_for_every(what, timeout, Duration::from_millis(250), f)
}

/// `wait_for`, polling every `every`.
pub fn wait_for_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(every);
    }
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

pub fn name(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

/// A test case: a name and a body.
pub type Case = (&'static str, fn(&Lab) -> Result<()>);

/// Runs a suite against a lab of its own: fails loudly without root, takes down any lab an
/// earlier run left, runs the cases in order, then takes the lab down whatever happened, and
/// prints libtest's summary line.
pub fn run_suite(suite: &str, cases: &[Case]) -> std::process::ExitCode {
    let start = Instant::now();
    let fail = |why: String| {
        println!("test {suite} ... FAILED\n  {why}");
        println!("\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        std::process::ExitCode::FAILURE
    };
    if run("id", &["-u"]).map(|s| s.trim() != "0").unwrap_or(true) {
        return fail(format!("the {suite} tests need root (network namespaces, the control plane): run them as root"));
    }
    let lab = match Lab::new() {
        Ok(l) => l,
        Err(e) => return fail(format!("{e:#}")),
    };
    if let Err(e) = lab.lab(&["down"]) {
        println!("warning: initial down: {e:#}");
    }
    let (passed, failed) = run_cases(&lab, cases);
    keep_lab_logs(suite);
    let _ = output("pkill", &["-f", "ferrolb-controller --identity="]);
    let _ = output(lab.bin(), &["down"]);
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        start.elapsed().as_secs_f64()
    );
    if failed == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}

/// Copies the lab's logs (control plane, node agents, every pod's) to
/// `$TMPDIR/ferrolb-e2e-SUITE-lab/` before the lab goes down, for whoever reads a failure (or a
/// figure) later.
fn keep_lab_logs(suite: &str) {
    let to = std::env::temp_dir().join(format!("ferrolb-e2e-{suite}-lab"));
    let _ = std::fs::remove_dir_all(&to);
    if std::fs::create_dir_all(&to).is_err() {
        return;
    }
    for part in ["logs", "nodes"] {
        let from = std::path::Path::new("/run/ferrolb-lab").join(part);
        if from.exists() {
            let _ = output("cp", &["-r", &from.to_string_lossy(), &to.to_string_lossy()]);
        }
    }
    println!("the lab's logs are kept in {}", to.display());
}

/// Runs cases in order, printing libtest-style lines; (passed, failed).
///
/// Arguments after `--` (`cargo test --test tenant -- legacy churn`) keep only the cases whose
/// name holds one of them, and the `setup…` cases they need.
pub fn run_cases(lab: &Lab, cases: &[Case]) -> (usize, usize) {
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let chosen =
        |name: &str| only.is_empty() || name.starts_with("setup") || only.iter().any(|o| name.contains(o.as_str()));
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in cases.iter().filter(|(name, _)| chosen(name)) {
        let start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(lab)));
        let secs = start.elapsed().as_secs_f64();
        match r {
            Ok(Ok(())) => {
                passed += 1;
                println!("test {name} ... ok ({secs:.1} s)");
            }
            Ok(Err(e)) => {
                failed += 1;
                println!("test {name} ... FAILED ({secs:.1} s)\n  {e:#}");
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED ({secs:.1} s): panicked");
            }
        }
    }
    (passed, failed)
}

/// A background process a test started, with its output appended to a log in the temp dir;
/// killed when dropped.
pub struct Proc {
    child: Option<std::process::Child>,
}

impl Proc {
    fn spawn(mut cmd: Command, log_name: &str) -> Result<Self> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(std::env::temp_dir().join(format!("ferrolb-e2e-{log_name}.log")))?;
        let child = cmd.stdout(log.try_clone()?).stderr(log).spawn()?;
        Ok(Proc { child: Some(child) })
    }

    fn signal(&mut self, sig: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for it to exit.
    pub fn stop(&mut self) {
        self.signal("-TERM");
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        self.signal("-KILL");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `ferrolb-controller` process run from the root namespace against the lab, as a
/// Deployment's replica would run (the chart issue runs it as a real pod).
pub struct Controller {
    pub name: String,
    pub metrics_port: u16,
    proc: Proc,
    args: Vec<String>,
}

impl Controller {
    pub fn bin() -> Result<PathBuf> {
        let p = lab_bin()?.with_file_name("ferrolb-controller");
        if !p.is_file() {
            bail!("{} is not built: run 'cargo build --workspace --bins' first", p.display());
        }
        Ok(p)
    }

    /// Starts a replica named `name` (its lease identity), with `/metrics` on 127.0.0.1:`port`.
    pub fn start(name: &str, metrics_port: u16, extra: &[&str]) -> Result<Self> {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let proc = Self::spawn(name, metrics_port, &args)?;
        Ok(Controller { name: name.to_string(), metrics_port, proc, args })
    }

    fn spawn(name: &str, metrics_port: u16, args: &[String]) -> Result<Proc> {
        let mut cmd = Command::new(Self::bin()?);
        cmd.args([
            format!("--identity={name}"),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            "--lease-duration=6".to_string(),
        ])
        .args(args)
        .env("KUBECONFIG", "/run/ferrolb-lab/kubeconfig")
        .env("FERROLB_LOG_LEVEL", "info,kube_lease_manager=warn");
        Proc::spawn(cmd, name)
    }

    /// Starts it again after a stop or kill (a running one is killed first).
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(&self.name, self.metrics_port, &self.args)?;
        Ok(())
    }

    /// SIGTERM, and wait for it to exit (it releases its lease first).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// SIGKILL: a crash, the lease is left to expire.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Its `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        run("curl", &["-sS", "--max-time", "3", &format!("http://127.0.0.1:{}/metrics", self.metrics_port)])
    }
}

/// The Secret (in ferrolb-system, key `secretkey`) the test speakers read their shared
/// membership secret from.
pub const MEMBERSHIP_SECRET: &str = "ferrolb-memberlist";

/// A `ferrolb-speaker run` on a lab node, in the node's network namespace (the chart issue runs
/// it as a host-network DaemonSet pod).
pub struct Speaker {
    pub node: String,
    proc: Proc,
    /// Environment given to every start (test hooks such as `FERROLB_FAULT_REJECT_SERVICE`).
    env: Vec<(String, String)>,
}

impl Speaker {
    /// Starts the speaker of node-`index`.
    pub fn start(index: u8) -> Result<Self> {
        Self::start_with_env(index, &[])
    }

    /// Starts the speaker of node-`index` with `env` added to its environment (kept on restarts).
    pub fn start_with_env(index: u8, env: &[(&str, &str)]) -> Result<Self> {
        let node = format!("node-{index}");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let proc = Self::spawn(&node, index, &[], &env)?;
        Ok(Speaker { node, proc, env })
    }

    fn spawn(node: &str, index: u8, extra: &[&str], env: &[(String, String)]) -> Result<Proc> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{node}"))
            .arg("--")
            .arg(lab_bin()?.with_file_name("ferrolb-speaker"))
            .args(["run", &format!("--node={node}"), &format!("--node-ip=192.0.2.{}", 10 + index)])
            .arg(format!("--membership-secret={MEMBERSHIP_SECRET}"))
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", "/run/ferrolb-lab/pki/admin.kubeconfig");
        Proc::spawn(cmd, &format!("speaker-{node}"))
    }

    /// Starts it again (a running one is killed first).
    pub fn restart(&mut self) -> Result<()> {
        self.restart_with(&[])
    }

    /// Starts it again with more flags (a running one is killed first).
    pub fn restart_with(&mut self, extra: &[&str]) -> Result<()> {
        self.proc.kill();
        let index: u8 = self.node.trim_start_matches("node-").parse()?;
        self.proc = Self::spawn(&self.node, index, extra, &self.env)?;
        Ok(())
    }

    /// SIGTERM: it leaves the membership first.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// The MAC address of a lab host's eth0, upper case as arping prints it.
pub fn host_mac(host: &str) -> Result<String> {
    let link = run("ip", &["-n", host, "-o", "link", "show", "eth0"])?;
    let mac = link.split("link/ether ").nth(1).and_then(|r| r.split_whitespace().next()).context("no MAC")?;
    Ok(mac.to_uppercase())
}

/// MACs that answered `count` ARP requests for `ip` from the client, one per reply.
pub fn arping(ip: &str, count: u32) -> Result<Vec<String>> {
    let out = output(
        "ip",
        &[
            "netns",
            "exec",
            "client",
            "arping",
            "-c",
            &count.to_string(),
            "-w",
            &(count + 1).to_string(),
            "-I",
            "eth0",
            ip,
        ],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next().map(str::to_string))
        .collect())
}

/// The lab's node names by the MAC of their eth0 (upper case, as arping prints it).
pub fn node_macs() -> Result<std::collections::BTreeMap<String, String>> {
    (1..=3).map(|i| Ok((host_mac(&format!("node-{i}"))?, format!("node-{i}")))).collect()
}

/// The node answering for `ip`: every one of `count` replies from the same MAC.
pub fn announcer(ip: &str, count: u32) -> Result<Option<String>> {
    let macs = arping(ip, count)?;
    let nodes = node_macs()?;
    if macs.is_empty() {
        return Ok(None);
    }
    ensure!(macs.len() == count as usize, "{count} requests got {} replies: {macs:?}", macs.len());
    ensure!(macs.iter().all(|m| *m == macs[0]), "replies from several MACs: {macs:?}");
    nodes.get(&macs[0]).cloned().map(Some).with_context(|| format!("{} is no node's MAC", macs[0]))
}

pub fn wait_announcer(ip: &str, not: Option<&str>) -> Result<String> {
    wait_for(&format!("a node to answer for {ip}"), Duration::from_secs(20), || {
        Ok(announcer(ip, 1)?.filter(|n| Some(n.as_str()) != not))
    })
}

/// The node answering for `ip` once the answers have settled: the same node three times in a
/// row, so a test does not start from a takeover still in flight.
pub fn settled_announcer(ip: &str) -> Result<String> {
    let mut last: Vec<String> = Vec::new();
    wait_for(&format!("the answers for {ip} to settle"), Duration::from_secs(30), || {
        if let Some(n) = announcer(ip, 1)? {
            last.push(n);
        }
        std::thread::sleep(Duration::from_millis(300));
        let n = last.len();
        Ok((n >= 3 && last[n - 3..].iter().all(|x| *x == last[n - 1])).then(|| last[n - 1].clone()))
    })
}

/// What ferrolb needs in the lab before a controller and speakers start: the CRDs, namespace
/// `ferrolb-system` with the membership Secret, pool `lan` of `addresses`, and an
/// L2Advertisement for every pool.
pub fn ferrolb_system(lab: &Lab, addresses: &[&str]) -> Result<()> {
    lab.kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds")])?;
    lab.kubectl(&["wait", "--for=condition=Established", "crd/l2advertisements.ferrolb.io", "--timeout=30s"])?;
    lab.kubectl(&["create", "namespace", "ferrolb-system"])?;
    lab.kubectl(&[
        "create",
        "secret",
        "generic",
        MEMBERSHIP_SECRET,
        "-n",
        "ferrolb-system",
        "--from-literal=secretkey=lab-e2e-shared-secret",
    ])?;
    lab.apply(&format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: lan, namespace: ferrolb-system}}\nspec:\n  addresses: [{}]\n---\napiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: all, namespace: ferrolb-system}}\n",
        addresses.join(", ")
    ))
}

/// The lab's demo: the hostname Deployment and its Services (`deploy/demo`).
pub fn apply_demo(lab: &Lab) -> Result<()> {
    lab.kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/demo/hostname.yaml")])?;
    lab.kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/demo/services.yaml")])?;
    Ok(())
}

/// A controller (`/metrics` on 127.0.0.1:`controller_port`) and the speakers of node-1 to node-3
/// (with `env` added to their environment), returned once the demo's LoadBalancer address
/// answers the client.
pub fn start_ferrolb(lab: &Lab, controller_port: u16, env: &[(&str, &str)]) -> Result<(Controller, Vec<Speaker>)> {
    let controller = Controller::start("ctl", controller_port, &[])?;
    let speakers = (1..=3).map(|i| Speaker::start_with_env(i, env)).collect::<Result<Vec<_>>>()?;
    let ip = lb_ip(lab, "hostname-svc-lb")?;
    wait_for("the LoadBalancer address to answer", Duration::from_secs(30), || {
        Ok(lab.curl("client", &url(&ip, 80)).ok().filter(|b| b.contains("hostname:")).map(drop))
    })?;
    Ok((controller, speakers))
}

/// `(HTTP status, body)` of a GET from lab host `host`.
pub fn http_get(host: &str, url: &str) -> Result<(String, String)> {
    let out = output("ip", &["netns", "exec", host, "curl", "-sS", "--max-time", "3", "-w", "\n%{http_code}", url])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').context("no status")?;
    Ok((code.to_string(), body.to_string()))
}

/// `(HTTP status, body)` of a GET of `path` from the speaker of node-`n` (metrics and health).
pub fn speaker_get(n: u8, path: &str) -> Result<(String, String)> {
    http_get(&format!("node-{n}"), &format!("http://192.0.2.{}:7472{path}", 10 + n))
}

/// Peak resident memory (`VmHWM`) of a process, KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// A Service as JSON: `name` in namespace `default`, or `namespace/name`.
pub fn svc(lab: &Lab, name: &str) -> Result<Value> {
    match name.split_once('/') {
        Some((ns, name)) => lab.kubectl_json(&["get", "service", "-n", ns, name]),
        None => lab.kubectl_json(&["get", "service", name]),
    }
}

/// The service's IPv4 `status.loadBalancer.ingress` address, waiting for it (`name` as in [`svc`]).
pub fn lb_ip(lab: &Lab, name: &str) -> Result<String> {
    wait_for(&format!("an address for {name}"), Duration::from_secs(20), || {
        let v = svc(lab, name)?;
        let ingress = v["status"]["loadBalancer"]["ingress"].as_array().cloned().unwrap_or_default();
        Ok(ingress.iter().filter_map(|i| i["ip"].as_str()).find(|ip| !ip.contains(':')).map(str::to_string))
    })
}

/// The service's `i`-th cluster IP (`name` as in [`svc`]).
pub fn cluster_ip_of(lab: &Lab, name: &str, i: usize) -> Result<String> {
    svc(lab, name)?["spec"]["clusterIPs"][i].as_str().map(str::to_string).context("no cluster IP")
}

/// `http://ip:port/`, with brackets for IPv6.
pub fn url(ip: &str, port: u16) -> String {
    if ip.contains(':') { format!("http://[{ip}]:{port}/") } else { format!("http://{ip}:{port}/") }
}

/// The pod and client address in a hostname server's answer.
pub fn answer(body: &str) -> Result<(String, String)> {
    let field = |k: &str| body.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
    let pod = field("hostname:").with_context(|| format!("not a hostname answer: {body:?}"))?;
    let client = field("client:").with_context(|| format!("no client line: {body:?}"))?;
    Ok((pod, client))
}

/// Messages of the Events with `reason` on Service `name` (`name` as in [`svc`]), one a line.
pub fn events(lab: &Lab, name: &str, reason: &str) -> Result<String> {
    let (ns, name) = name.split_once('/').unwrap_or(("default", name));
    lab.kubectl(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        &format!("involvedObject.name={name},reason={reason}"),
        "-o",
        "jsonpath={range .items[*]}{.note}{.message}{\"\\n\"}{end}",
    ])
}

/// Waits up to 20 s for an Event with `reason` on Service `name` whose message holds `needle`.
pub fn wait_event(lab: &Lab, name: &str, reason: &str, needle: &str) -> Result<String> {
    wait_for(&format!("a {reason} event on {name} saying {needle:?}"), Duration::from_secs(20), || {
        let ev = events(lab, name, reason)?;
        Ok(ev.contains(needle).then_some(ev))
    })
}
