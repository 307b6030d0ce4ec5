//! An independent client, written in Python (standard library only) from docs/PROTOCOL.md
//! alone, runs its end-to-end scenario against the real daemon: proof that the document is
//! enough to implement the protocol without reading the Rust sources.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::TestServer;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/independent_client/messenger_client.py"
);

/// Generous upper bound for the whole scenario (it normally takes a few seconds).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_client_written_from_the_protocol_document_alone_works() {
    let ts = TestServer::start().await;
    let addr = ts.server().addr.to_string();
    let ca = ts.server().dev_ca.clone().expect("development CA");

    let child = tokio::process::Command::new("python3")
        .arg(SCRIPT)
        .arg("--addr")
        .arg(&addr)
        .arg("--ca")
        .arg(&ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 ({e}): this test needs a Python 3 interpreter named \
                 `python3` on PATH to run {SCRIPT}"
            )
        });
    let output = tokio::time::timeout(SCENARIO_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the Python scenario did not finish in {SCENARIO_TIMEOUT:?}"))
        .expect("wait for python3");

    ts.stop().await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the independent Python client failed ({}) against {addr}\n\
         --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("OK: every check passed"),
        "the Python scenario exited 0 without its success line\n\
         --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
}
