//! Apiserver helpers the benchmarks share: namespaces, watch-observed timings and the plain
//! write floor every latency is compared with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use super::BenchResult;

/// Creates namespace `name`.
pub async fn namespace(client: &Client, name: &str) -> BenchResult<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// Records when each object name is first seen satisfying `done`.
pub fn observe<K, F>(api: Api<K>, done: F) -> Arc<Mutex<HashMap<String, Instant>>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(&K) -> bool + Send + 'static,
{
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Ok(Some(object)) = events.try_next().await {
            if done(&object) {
                let name = object.meta().name.clone().unwrap_or_default();
                record
                    .lock()
                    .expect("lock")
                    .entry(name)
                    .or_insert_with(Instant::now);
            }
        }
    });
    seen
}

/// When `name` was first seen by an [`observe`] map; waits for it up to two minutes.
pub async fn wait_for(seen: &Mutex<HashMap<String, Instant>>, name: &str) -> BenchResult<Instant> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(at) = seen.lock().expect("lock").get(name) {
            return Ok(*at);
        }
        if Instant::now() > deadline {
            return Err(format!("{name} never observed").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The write floor: `count` plain ConfigMap creates in a fresh namespace `ns`, each timed
/// until a watch sees it, what any controller's write costs on this apiserver.
pub async fn floor(client: &Client, ns: &str, count: usize) -> BenchResult<Vec<f64>> {
    namespace(client, ns).await?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let seen = observe(maps.clone(), |_| true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = Vec::new();
    for i in 0..count {
        let name = format!("floor-{i}");
        let start = Instant::now();
        maps.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await?;
        samples.push(
            wait_for(&seen, &name)
                .await?
                .duration_since(start)
                .as_secs_f64(),
        );
    }
    Ok(samples)
}
