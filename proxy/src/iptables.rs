//! `trellis-proxy iptables`: the rules a sidecar's init container installs so the pod's TCP
//! reaches the proxy's capture listeners, generated here as `iptables-restore` input (pure, so
//! the rules are tested as text) and applied by running the backend's binaries.
//!
//! The rules (nat table, own chains so `clean` removes exactly them and a second run replaces
//! them instead of adding to them):
//! - PREROUTING → TRELLIS_INBOUND: TCP arriving at the pod goes to the inbound capture port,
//!   except the admin port (probes reach it directly) and `--exclude-inbound-ports`.
//! - OUTPUT → TRELLIS_OUTPUT: TCP the pod opens goes to the outbound capture port, except:
//!   the proxy's own connections (owner match on its UID, and GID when given), which would loop
//!   otherwise; loopback (`-o lo`), so the proxy reaching the application on 127.0.0.1 and the
//!   application's own local traffic are left alone; `--exclude-outbound-ports` and
//!   `--exclude-outbound-cidrs`. One exception, as Istio does: the proxy connecting to the pod's
//!   own (non-loopback) address, which the kernel routes over `lo` (a pod calling a Service that
//!   selects itself), goes to the inbound capture port, so the call is seen on both sides —
//!   except from [`INBOUND_PASSTHROUGH_SOURCE`]: the inbound side passing a connection on to the
//!   pod's own address binds that source, so it is not captured again (and again).
//!
//! [`INBOUND_PASSTHROUGH_SOURCE`]: trellis_proxy::capture::INBOUND_PASSTHROUGH_SOURCE

use std::{
    fmt::{self, Write as _},
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
    str::FromStr,
};

use clap::{Args, Subcommand, ValueEnum};

/// Chains this command owns; `clean` flushes and deletes exactly these.
const INBOUND: &str = "TRELLIS_INBOUND";
const IN_REDIRECT: &str = "TRELLIS_IN_REDIRECT";
const OUTPUT: &str = "TRELLIS_OUTPUT";
const REDIRECT: &str = "TRELLIS_REDIRECT";
const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];
/// The built-in chains jumping to ours.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND), ("OUTPUT", OUTPUT)];

/// Install (or with `clean`, remove) the traffic capture rules of a sidecar's pod. Run as root
/// (or with CAP_NET_ADMIN and CAP_NET_RAW) in the pod's network namespace, before the
/// application starts, as an init container does.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct IptablesArgs {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Print what would run (the rules in iptables-restore format) and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Which iptables: `legacy` (iptables-legacy*), `nft` (iptables-nft*) or `auto` (whichever
    /// `iptables` is, as the distribution's alternatives chose).
    #[arg(long, value_enum, default_value_t, global = true)]
    pub backend: Backend,
    /// Also write the IPv6 rules (ip6tables), for dual-stack or IPv6 pods.
    #[arg(long, global = true)]
    pub ipv6: bool,
    #[command(flatten)]
    pub options: Options,
}

#[derive(Subcommand, Clone, Debug, PartialEq)]
pub enum Action {
    /// Remove the rules and chains this command installed (nothing else).
    Clean,
}

/// What the rules capture and leave alone.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct Options {
    /// UID the proxy runs as; its own connections are never captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// GID the proxy runs as, also excluded when given.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Port of the outbound capture listener.
    #[arg(long, default_value_t = 15001, value_parser = parse_port)]
    pub outbound_port: u16,
    /// Port of the inbound capture listener.
    #[arg(long, default_value_t = 15006, value_parser = parse_port)]
    pub inbound_port: u16,
    /// The proxy's admin port, reached directly (probes, metrics) rather than captured.
    #[arg(long, default_value_t = 15000, value_parser = parse_port)]
    pub admin_port: u16,
    /// Inbound ports not captured, comma-separated (e.g. `22,9100`).
    #[arg(long, value_delimiter = ',', value_parser = parse_port)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports not captured, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_port)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks not captured, comma-separated (`169.254.169.254/32`,
    /// `fd00::/8`); each goes to the rules of its address family.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    #[default]
    Auto,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
            Backend::Auto => "auto",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Backend {
    /// The `iptables` and `iptables-restore` binaries of this backend for `family`.
    pub fn binaries(self, family: Family) -> (String, String) {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let suffix = match self {
            Backend::Legacy => "-legacy",
            Backend::Nft => "-nft",
            Backend::Auto => "",
        };
        (format!("{base}{suffix}"), format!("{base}{suffix}-restore"))
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// An address and prefix length, `10.0.0.0/8` or a bare address (a host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an address or CIDR (10.0.0.0/8, fd00::/8)");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IptablesError {
    #[error(
        "--outbound-port and --inbound-port are both {0}; the capture listeners need two ports"
    )]
    SamePorts(u16),
    #[error("--admin-port {0} is also a capture port (--outbound-port or --inbound-port)")]
    AdminIsCapturePort(u16),
    #[error(
        "--exclude-outbound-cidrs {0} is IPv6 but --ipv6 is off; add --ipv6 or drop the network"
    )]
    Ipv6CidrWithoutIpv6(Cidr),
    #[error("cannot run {binary} (--backend {backend}; is iptables installed?): {reason}")]
    MissingBinary {
        binary: String,
        backend: Backend,
        reason: String,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

impl Options {
    /// Contradictions clap cannot see, each naming its flags.
    pub fn check(&self, ipv6: bool) -> Result<(), IptablesError> {
        if self.outbound_port == self.inbound_port {
            return Err(IptablesError::SamePorts(self.outbound_port));
        }
        if [self.outbound_port, self.inbound_port].contains(&self.admin_port) {
            return Err(IptablesError::AdminIsCapturePort(self.admin_port));
        }
        if !ipv6
            && let Some(c) = self
                .exclude_outbound_cidrs
                .iter()
                .find(|c| c.addr.is_ipv6())
        {
            return Err(IptablesError::Ipv6CidrWithoutIpv6(*c));
        }
        Ok(())
    }
}

use trellis_proxy::capture::INBOUND_PASSTHROUGH_SOURCE;

/// The rules for one address family, as `iptables-restore --noflush` input: declaring our
/// chains empties them, so applying twice gives the same chains (the jumps are added by
/// [`apply`] after [`clean`] removed the old ones).
pub fn rules(o: &Options, family: Family) -> String {
    let loopback = match family {
        Family::V4 => "127.0.0.1/32",
        Family::V6 => "::1/128",
    };
    let mut r = String::from("*nat\n");
    for chain in CHAINS {
        let _ = writeln!(r, ":{chain} - [0:0]");
    }
    let mut add = |chain: &str, rule: String| {
        let _ = writeln!(r, "-A {chain} {rule}");
    };
    add(
        IN_REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", o.inbound_port),
    );
    add(
        REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", o.outbound_port),
    );

    let mut inbound_excluded = vec![o.admin_port];
    inbound_excluded.extend(&o.exclude_inbound_ports);
    dedup(&mut inbound_excluded);
    for port in inbound_excluded {
        add(INBOUND, format!("-p tcp --dport {port} -j RETURN"));
    }
    add(INBOUND, format!("-p tcp -j {IN_REDIRECT}"));

    let uid = o.proxy_uid;
    if family == Family::V4 {
        add(
            OUTPUT,
            format!("-o lo -s {INBOUND_PASSTHROUGH_SOURCE}/32 -j RETURN"),
        );
    }
    // The proxy calling the pod's own address (routed over lo): the inbound side.
    add(
        OUTPUT,
        format!("-o lo ! -d {loopback} -m owner --uid-owner {uid} -j {IN_REDIRECT}"),
    );
    add(OUTPUT, "-o lo -j RETURN".to_owned());
    add(OUTPUT, format!("-m owner --uid-owner {uid} -j RETURN"));
    if let Some(gid) = o.proxy_gid {
        add(OUTPUT, format!("-m owner --gid-owner {gid} -j RETURN"));
    }
    add(OUTPUT, format!("-d {loopback} -j RETURN"));
    for cidr in &o.exclude_outbound_cidrs {
        if cidr.addr.is_ipv4() == (family == Family::V4) {
            add(OUTPUT, format!("-d {cidr} -j RETURN"));
        }
    }
    let mut outbound_excluded = o.exclude_outbound_ports.clone();
    dedup(&mut outbound_excluded);
    for port in outbound_excluded {
        add(OUTPUT, format!("-p tcp --dport {port} -j RETURN"));
    }
    add(OUTPUT, format!("-j {REDIRECT}"));
    for (builtin, ours) in JUMPS {
        add(builtin, format!("-p tcp -j {ours}"));
    }
    r.push_str("COMMIT\n");
    r
}

fn dedup(ports: &mut Vec<u16>) {
    ports.sort_unstable();
    ports.dedup();
}

/// The `iptables` arguments that remove our jumps and chains; each may fail harmlessly when
/// there is nothing to remove. A jump is deleted once per copy (up to a bound), so rules left by
/// an older run that added them twice go too.
pub fn clean_commands() -> Vec<Vec<String>> {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut out = Vec::new();
    for (builtin, ours) in JUMPS {
        out.push(args(&[
            "-w", "-t", "nat", "-D", builtin, "-p", "tcp", "-j", ours,
        ]));
    }
    for chain in CHAINS {
        out.push(args(&["-w", "-t", "nat", "-F", chain]));
    }
    for chain in CHAINS {
        out.push(args(&["-w", "-t", "nat", "-X", chain]));
    }
    out
}

fn families(ipv6: bool) -> Vec<Family> {
    if ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Runs the command: installs the rules or removes them, or with `--dry-run` prints them.
pub fn run(args: &IptablesArgs) -> Result<(), IptablesError> {
    let families = families(args.ipv6);
    if args.action == Some(Action::Clean) {
        for family in families {
            clean(args.backend, family, args.dry_run)?;
        }
        return Ok(());
    }
    args.options.check(args.ipv6)?;
    for family in families {
        let rules = rules(&args.options, family);
        let (_, restore) = args.backend.binaries(family);
        if args.dry_run {
            println!("# {restore} --noflush");
            print!("{rules}");
            continue;
        }
        clean(args.backend, family, false)?;
        apply(args.backend, family, &rules)?;
    }
    Ok(())
}

fn clean(backend: Backend, family: Family, dry_run: bool) -> Result<(), IptablesError> {
    let (iptables, _) = backend.binaries(family);
    for args in clean_commands() {
        if dry_run {
            println!("{iptables} {}", args.join(" "));
            continue;
        }
        // Delete a jump until none is left (bounded); flush and delete a chain that may not
        // exist. Only a missing binary is an error: anything else means nothing to remove.
        let repeat = if args[3] == "-D" { 16 } else { 1 };
        for _ in 0..repeat {
            let out = Command::new(&iptables)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| missing(&iptables, backend, e))?;
            if !out.status.success() {
                break;
            }
        }
    }
    Ok(())
}

fn apply(backend: Backend, family: Family, rules: &str) -> Result<(), IptablesError> {
    let (_, restore) = backend.binaries(family);
    let mut child = Command::new(&restore)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| missing(&restore, backend, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows as the child's failure below.
        let _ = stdin.write_all(rules.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| missing(&restore, backend, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IptablesError::Failed {
            command: format!("{restore} -w --noflush"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn missing(binary: &str, backend: Backend, e: std::io::Error) -> IptablesError {
    IptablesError::MissingBinary {
        binary: binary.to_owned(),
        backend,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: IptablesArgs,
    }

    fn parse(flags: &[&str]) -> Result<IptablesArgs, String> {
        let argv = std::iter::once("iptables").chain(flags.iter().copied());
        Cli::try_parse_from(argv)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    const DEFAULT_V4: &str = "*nat
:TRELLIS_INBOUND - [0:0]
:TRELLIS_IN_REDIRECT - [0:0]
:TRELLIS_OUTPUT - [0:0]
:TRELLIS_REDIRECT - [0:0]
-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A TRELLIS_INBOUND -p tcp --dport 15000 -j RETURN
-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT
-A TRELLIS_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A TRELLIS_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j TRELLIS_IN_REDIRECT
-A TRELLIS_OUTPUT -o lo -j RETURN
-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A TRELLIS_OUTPUT -d 127.0.0.1/32 -j RETURN
-A TRELLIS_OUTPUT -j TRELLIS_REDIRECT
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
COMMIT
";

    #[test]
    fn default_rules() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.backend, Backend::Auto);
        assert!(!args.ipv6 && !args.dry_run && args.action.is_none());
        assert_eq!(rules(&args.options, Family::V4), DEFAULT_V4);
    }

    #[test]
    fn options_in_the_rules() {
        let args = parse(&[
            "--proxy-uid=2000",
            "--proxy-gid=2001",
            "--outbound-port=16001",
            "--inbound-port=16006",
            "--admin-port=16000",
            "--exclude-inbound-ports=22,9100,22",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs=169.254.169.254,10.0.0.0/8,fd00::/8",
            "--ipv6",
        ])
        .unwrap();
        args.options.check(args.ipv6).unwrap();
        let v4 = rules(&args.options, Family::V4);
        for line in [
            "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
            "-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
            "-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN\n\
             -A TRELLIS_INBOUND -p tcp --dport 9100 -j RETURN\n\
             -A TRELLIS_INBOUND -p tcp --dport 16000 -j RETURN\n\
             -A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT\n",
            "-A TRELLIS_OUTPUT -m owner --uid-owner 2000 -j RETURN\n\
             -A TRELLIS_OUTPUT -m owner --gid-owner 2001 -j RETURN\n",
            "-A TRELLIS_OUTPUT -d 169.254.169.254/32 -j RETURN\n\
             -A TRELLIS_OUTPUT -d 10.0.0.0/8 -j RETURN\n\
             -A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN\n\
             -A TRELLIS_OUTPUT -j TRELLIS_REDIRECT\n",
        ] {
            assert!(v4.contains(line), "{line}\nnot in\n{v4}");
        }
        assert!(!v4.contains("fd00::"));
        let v6 = rules(&args.options, Family::V6);
        assert!(v6.contains("-A TRELLIS_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(v6.contains("-A TRELLIS_OUTPUT -o lo ! -d ::1/128 -m owner --uid-owner 2000"));
        assert!(v6.contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN\n"));
        assert!(!v6.contains("10.0.0.0"));
    }

    #[test]
    fn bad_flags_are_named() {
        for (flags, want) in [
            (&["--outbound-port=0"][..], "--outbound-port"),
            (&["--inbound-port=70000"], "--inbound-port"),
            (&["--exclude-inbound-ports=22,x"], "--exclude-inbound-ports"),
            (&["--exclude-outbound-ports=-1"], "--exclude-outbound-ports"),
            (
                &["--exclude-outbound-cidrs=10.0.0.0/33"],
                "--exclude-outbound-cidrs",
            ),
            (
                &["--exclude-outbound-cidrs=example.com"],
                "--exclude-outbound-cidrs",
            ),
            (&["--backend=iptables"], "--backend"),
            (&["--proxy-uid=-5"], "--proxy-uid"),
        ] {
            let e = parse(flags).unwrap_err();
            assert!(e.contains(want), "{flags:?}: {e}");
        }
        for (flags, want) in [
            (
                &["--outbound-port=15006"][..],
                "--outbound-port and --inbound-port",
            ),
            (&["--admin-port=15001"], "--admin-port 15001"),
            (
                &["--exclude-outbound-cidrs=fd00::/8"],
                "--exclude-outbound-cidrs fd00::/8",
            ),
        ] {
            let args = parse(flags).unwrap();
            let e = args.options.check(args.ipv6).unwrap_err().to_string();
            assert!(e.contains(want), "{flags:?}: {e}");
        }
    }

    #[test]
    fn clean_removes_only_our_jumps_and_chains() {
        let args = parse(&["clean", "--backend=legacy", "--dry-run"]).unwrap();
        assert_eq!(args.action, Some(Action::Clean));
        assert!(args.dry_run);
        let lines: Vec<String> = clean_commands().iter().map(|a| a.join(" ")).collect();
        assert_eq!(
            lines,
            [
                "-w -t nat -D PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-w -t nat -D OUTPUT -p tcp -j TRELLIS_OUTPUT",
                "-w -t nat -F TRELLIS_INBOUND",
                "-w -t nat -F TRELLIS_IN_REDIRECT",
                "-w -t nat -F TRELLIS_OUTPUT",
                "-w -t nat -F TRELLIS_REDIRECT",
                "-w -t nat -X TRELLIS_INBOUND",
                "-w -t nat -X TRELLIS_IN_REDIRECT",
                "-w -t nat -X TRELLIS_OUTPUT",
                "-w -t nat -X TRELLIS_REDIRECT",
            ]
        );
    }

    #[test]
    fn backends_name_their_binaries() {
        assert_eq!(
            Backend::Legacy.binaries(Family::V4),
            ("iptables-legacy".into(), "iptables-legacy-restore".into())
        );
        assert_eq!(
            Backend::Nft.binaries(Family::V6),
            ("ip6tables-nft".into(), "ip6tables-nft-restore".into())
        );
        assert_eq!(
            Backend::Auto.binaries(Family::V6),
            ("ip6tables".into(), "ip6tables-restore".into())
        );
    }
}
