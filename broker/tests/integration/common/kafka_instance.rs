//! A Kafka of one test's own (`scripts/kafka-local` on its own port and run
//! directory), for tests that stop, slow or reconfigure Kafka without
//! disturbing the shared one.

use std::process::Command;

/// `.run/<name>` of the repository.
pub fn run_dir(name: &str) -> String {
    format!("{}/../.run/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/kafka-local CMD` for one test instance; `extra` env on top.
pub fn kafka_local(port: u16, dir: &str, cmd: &str, extra: &[(&str, String)]) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka-local");
    let mut c = Command::new("bash");
    c.args([script, cmd])
        .env("KAFKA_PORT", port.to_string())
        .env("KAFKA_RUN_DIR", run_dir(dir))
        .env("KAFKA_HEAP", "-Xmx512m")
        .env("KAFKA_STOP_TIMEOUT", "15");
    for (k, v) in extra {
        c.env(k, v);
    }
    c.status().map(|s| s.success()).unwrap_or(false)
}

/// `kafka_local` off the async runtime's threads.
pub async fn kafka_local_async(
    port: u16,
    dir: &'static str,
    cmd: &'static str,
    extra: Vec<(&'static str, String)>,
) -> bool {
    tokio::task::spawn_blocking(move || kafka_local(port, dir, cmd, &extra))
        .await
        .unwrap_or(false)
}

/// Stops a test Kafka when the test ends, pass or fail.
pub struct StopKafka(pub u16, pub &'static str);
impl Drop for StopKafka {
    fn drop(&mut self) {
        kafka_local(self.0, self.1, "stop", &[]);
    }
}
