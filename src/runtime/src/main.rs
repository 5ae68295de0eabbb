//! The krun-oci command line: runc's commands and flags over the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use krun_oci::commands::{self, Context};
use krun_oci::logging::{self, Format};
use liboci_cli::{CommonCmd, GlobalOpts, StandardCmd};

#[derive(Parser, Debug)]
#[command(
    name = "krun-oci",
    disable_version_flag = true,
    about = "An OCI runtime that runs each container in its own microVM"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    /// The hypervisor backend: builtin (krun-oci's own VMM, needs a KVM that
    /// boots Linux guests) or qemu. Default: builtin where KVM can, else qemu.
    #[arg(long, global = true, value_parser = ["builtin", "qemu"])]
    hypervisor: Option<String>,
    /// Refuse to run a container without hardware virtualization: no
    /// fallback to TCG emulation, which is not a security boundary (also
    /// annotation io.krun-oci.require_kvm=true).
    #[arg(long, global = true)]
    require_kvm: bool,
    /// Boot every VM cold, never from a VM template (also annotation
    /// io.krun-oci.template=false).
    #[arg(long, global = true)]
    no_template: bool,
    /// Print the version (as runc does: version, commit, spec).
    #[arg(short = 'v', long = "version")]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// VM templates of the built-in VMM (see the README's "VM templates").
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Checkpoint a running container: its whole VM, captured into the
    /// image directory (built-in VMM; see the README's "Checkpoint").
    Checkpoint(commands::checkpoint::Args),
    /// Restore a container from a checkpoint's image directory, detached
    /// and running as it was (built-in VMM).
    Restore(commands::checkpoint::RestoreArgs),
    #[command(flatten)]
    Standard(StandardCmd),
    #[command(flatten)]
    Common(Box<CommonCmd>),
}

#[derive(Subcommand, Debug)]
enum TemplateCmd {
    /// Build the template of a VM shape ahead of its first container
    /// (a template found there is verified instead), and print its path.
    Build {
        /// The VM's vCPUs (a container's: from its CPU quota or cpuset,
        /// else 1; or io.krun-oci.vcpus).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// The VM's memory (a container's: its memory limit plus 64, else
        /// 512; or io.krun-oci.memory_mib).
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        /// Network cards: 1 for a container whose network namespace has
        /// an interface to carry (podman's default networks), else 0.
        #[arg(long, default_value_t = 0)]
        nets: usize,
    },
    /// List the templates: key, shape, size on disk, and whether each is
    /// current or stale (an input changed since its build).
    List {
        /// table or json.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// Remove the stale templates (a new build does this too), or every
    /// one with --all; a template being built or verified is left.
    Prune {
        #[arg(long)]
        all: bool,
    },
}

fn main() {
    // The built-in VMM's own process (krun_vmm::process): before anything
    // else of the CLI.
    if krun_vmm::process::is_vmm(std::env::args_os().nth(1).as_deref()) {
        krun_vmm::process::main();
    }
    krun_oci::mark_start();
    let cli = Cli::parse();
    if cli.version {
        println!("krun-oci version {}", env!("CARGO_PKG_VERSION"));
        println!("spec: 1.2.0");
        println!("hypervisors: builtin (KVM), qemu");
        std::process::exit(0);
    }
    let Some(command) = &cli.command else {
        use clap::CommandFactory;
        let _ = Cli::command().print_help();
        std::process::exit(1);
    };
    let format = match Format::parse(cli.global.log_format.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("krun-oci: {e}");
            std::process::exit(1);
        }
    };
    let logger = match logging::init(cli.global.log.as_deref(), format, cli.global.debug) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("krun-oci: --log: {e}");
            std::process::exit(1);
        }
    };
    let hypervisor = cli
        .hypervisor
        .as_deref()
        .map(|h| h.parse().expect("clap checked the value"));
    let ctx = Context {
        hypervisor,
        detached: false,
        require_kvm: cli.require_kvm,
        no_template: cli.no_template,
        console_copy: krun_oci::monitor::console_copy_from_env(),
        systemd_cgroup: cli.global.systemd_cgroup,
        root: cli
            .global
            .root
            .clone()
            .unwrap_or_else(|| PathBuf::from(krun_oci::state::DEFAULT_ROOT)),
    };
    use commands::lifecycle;
    let result = match command {
        Command::Template(TemplateCmd::Build {
            vcpus,
            memory_mib,
            nets,
        }) => commands::template::build(*vcpus, *memory_mib, *nets),
        Command::Template(TemplateCmd::List { format }) => commands::template::list(format),
        Command::Template(TemplateCmd::Prune { all }) => commands::template::prune(*all),
        Command::Checkpoint(a) => commands::checkpoint::checkpoint(&ctx, a),
        Command::Restore(a) => commands::checkpoint::restore(&ctx, a),
        Command::Standard(c) => match c {
            StandardCmd::Create(a) => commands::create::create(&ctx, a),
            StandardCmd::Start(a) => lifecycle::start(&ctx, a),
            StandardCmd::State(a) => lifecycle::state(&ctx, a),
            StandardCmd::Kill(a) => lifecycle::kill(&ctx, a),
            StandardCmd::Delete(a) => lifecycle::delete(&ctx, a),
        },
        Command::Common(c) => match c.as_ref() {
            CommonCmd::Run(args) => commands::run::run(&ctx, args),
            CommonCmd::Exec(a) => commands::exec::exec(&ctx, a),
            CommonCmd::Ps(a) => commands::info::ps(&ctx, a),
            CommonCmd::List(a) => commands::info::list(&ctx, a),
            CommonCmd::Features(_) => commands::info::features(),
            CommonCmd::Spec(a) => commands::info::spec(a),
            CommonCmd::Update(a) => commands::info::update(&ctx, a),
            CommonCmd::Pause(a) => lifecycle::pause(&ctx, a),
            CommonCmd::Resume(a) => lifecycle::resume(&ctx, a),
            other => Err(krun_oci::Error::Unsupported(format!(
                "{} is not implemented yet",
                name(other)
            ))),
        },
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let (code, msg) = (e.exit_code(), e.message());
            // As runc: the error goes to the log; stderr gets it plainly
            // too, unless the log is stderr. Plain text on a terminal reads
            // better than a text log record, so that case prints just once.
            let plain_stderr = logger.logs_to_stderr() && format == Format::Text;
            if !plain_stderr {
                logger.write(tracing::Level::ERROR, &msg);
            }
            if !logger.logs_to_stderr() || plain_stderr {
                eprintln!("krun-oci: {msg}");
            }
            std::process::exit(code);
        }
    }
}

/// The subcommand's name, from its debug form (`Run(Run { .. })` -> run).
fn name(c: &dyn std::fmt::Debug) -> String {
    let dbg = format!("{c:?}");
    dbg.split('(').next().unwrap_or("command").to_lowercase()
}
