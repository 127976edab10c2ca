//! Integration tests against a real kube-apiserver, etcd and garbage collector.
//!
//! One control plane serves the whole run (each test gets its own namespace), started before
//! the first test and torn down after the last, on failure too, and on Ctrl-C. The harness is
//! libtest-mimic so that this teardown runs: libtest offers no hook after the last test.

mod console;
mod controllers;
mod crd_validation;
mod deploy;
mod discovery;
mod enforcement;
mod examples;
mod exposure;
mod failclosed;
mod harness;
mod helm;
mod leader;
mod make_run;
mod notify;
mod plugin;
mod restart;
mod security;
mod sessions;
mod support;
mod workflow;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use libtest_mimic::{Arguments, Trial};
use portcullis::testenv::ControlPlane;
use support::{Ctx, TestResult};

/// A test body: gets its context, returns its verdict.
pub type TestFn = fn(Ctx) -> Pin<Box<dyn Future<Output = TestResult> + Send>>;

/// Turns async test functions into `(name, TestFn)` pairs.
#[macro_export]
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|ctx| Box::pin($name(ctx))) as $crate::TestFn)),*]
    };
}

fn all_tests() -> Vec<(String, TestFn)> {
    let modules: [(&str, Vec<(&str, TestFn)>); 19] = [
        ("console", console::tests()),
        ("controllers", controllers::tests()),
        ("crd_validation", crd_validation::tests()),
        ("deploy", deploy::tests()),
        ("discovery", discovery::tests()),
        ("enforcement", enforcement::tests()),
        ("examples", examples::tests()),
        ("exposure", exposure::tests()),
        ("failclosed", failclosed::tests()),
        ("harness", harness::tests()),
        ("helm", helm::tests()),
        ("leader", leader::tests()),
        ("restart", restart::tests()),
        ("make_run", make_run::tests()),
        ("plugin", plugin::tests()),
        ("notify", notify::tests()),
        ("security", security::tests()),
        ("sessions", sessions::tests()),
        ("workflow", workflow::tests()),
    ];
    modules
        .into_iter()
        .flat_map(|(module, tests)| {
            tests
                .into_iter()
                .map(move |(name, f)| (format!("{module}::{name}"), f))
        })
        .collect()
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // Most tests wait on the apiserver rather than compute: run more than one per core.
    args.test_threads.get_or_insert(6);
    let tests = all_tests();
    if args.list {
        let trials = tests
            .into_iter()
            .map(|(name, _)| Trial::test(name, || Ok(())))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (plane, operator) = match runtime.block_on(start()) {
        Ok((plane, operator)) => (Arc::new(plane), operator),
        Err(error) => {
            eprintln!("cannot start the local control plane: {error}");
            return ExitCode::FAILURE;
        }
    };
    let on_interrupt = plane.clone();
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_interrupt.stop();
            std::process::exit(130);
        }
    });
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let plane = plane.clone();
            let handle = runtime.handle().clone();
            Trial::test(name.clone(), move || {
                handle
                    .block_on(async move {
                        let ctx = Ctx::new(plane, operator, &name).await?;
                        test(ctx).await
                    })
                    .map_err(|e| e.to_string().into())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    plane.stop();
    conclusion.exit_code()
}

/// The control plane with Portcullis installed as `deploy/` installs it (admission policies
/// included) and the operator running in this process as its own service account (tests
/// that kill the operator start their own control plane and operator process).
async fn start() -> Result<(ControlPlane, SocketAddr), Box<dyn std::error::Error>> {
    let plane = ControlPlane::start().await?;
    portcullis::testenv::install::product(&plane).await?;
    let client = plane.client(portcullis::testenv::OPERATOR).await?;
    let http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], portcullis::testenv::free_port()?));
    let config = portcullis::controller::Config {
        http_addr,
        ..Default::default()
    };
    tokio::spawn(async move {
        if let Err(error) =
            portcullis::controller::run(client, config, std::future::pending()).await
        {
            eprintln!("the operator stopped: {error}");
        }
    });
    Ok((plane, http_addr))
}
