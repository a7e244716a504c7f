//! Real clients from other authors against the broker: mosquitto_pub /
//! mosquitto_sub (Debian mosquitto-clients) and Eclipse paho-mqtt (Python).
//! `.ci/run` installs both; a missing tool fails the test loudly.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    c.kill_on_drop(true);
    c
}

/// mosquitto_sub receives what mosquitto_pub publishes, through Kafka, in
/// both protocol versions; the record is in Kafka keyed by the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_and_sub() {
    let t = common::unique("cars");
    let b = common::start(&[format!("{t}:cars/#")]).await;
    let port = b.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let mut sub = tool("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-t",
                "cars/#",
                "-v",
                "-q",
                "1",
                // Not 2: a slow first delivery makes the loop below publish
                // again, and repeats of the first message must not use up
                // the count before the second one arrives.
                "-C",
                "100",
                "-W",
                "20",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub installed (apt-get install mosquitto-clients)");
        let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
        // Wait until the subscription is in place: retry publishing until the first line arrives.
        let mut first = None;
        for _ in 0..40 {
            let st = tool("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-t",
                    "cars/speed/1",
                    "-m",
                    "88",
                    "-q",
                    "1",
                ])
                .status()
                .await
                .expect("mosquitto_pub");
            assert!(st.success(), "mosquitto_pub failed");
            if let Ok(Ok(Some(l))) =
                tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
            {
                first = Some(l);
                break;
            }
        }
        assert_eq!(first.as_deref(), Some("cars/speed/1 88"), "{version}");
        let st = tool("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-t",
                "cars/location/1",
                "-m",
                "45.4,9.2",
                "-q",
                "2",
            ])
            .status()
            .await
            .expect("mosquitto_pub");
        assert!(st.success());
        let mut next = None;
        while let Ok(Ok(Some(l))) =
            tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await
        {
            if l.starts_with("cars/location/1") {
                next = Some(l);
                break;
            }
        }
        assert_eq!(
            next.as_deref(),
            Some("cars/location/1 45.4,9.2"),
            "{version}"
        );
        let _ = sub.kill().await;
    }
    // Every record: the loop above may have published cars/speed/1 several
    // times before mosquitto_sub's subscription was in place.
    let recs = common::read_topic(&t, usize::MAX, Duration::from_secs(5));
    assert!(recs
        .iter()
        .any(|r| r.key.as_deref() == Some("cars/location/1")
            && r.value.as_deref() == Some(&b"45.4,9.2"[..])));
}

/// Eclipse paho-mqtt 2.x, MQTT 3.1.1 and 5.0, QoS 0/1/2 with properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_python_client() {
    let b = common::start(&[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/paho_check.py");
    let out = tool("python3")
        .args([script, &b.port().to_string(), &common::unique("paho")])
        .output()
        .await
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "paho check failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("ok v311") && stdout.contains("ok v5"),
        "{stdout}"
    );
}
