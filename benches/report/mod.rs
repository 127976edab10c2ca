//! What the benchmarks share: the result row, percentiles, and the printed table. Each
//! benchmark includes this module with `mod report;`.

pub mod apiserver;

/// Any benchmark step may fail with any error; the message is what matters.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Runs a benchmark's body on a multi-threaded runtime and turns its outcome into the exit
/// code, printing the error of a failed run.
pub fn execute(body: impl Future<Output = BenchResult<()>>) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("benchmark failed: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One line of a benchmark's table (and of its JSON file).
#[derive(serde::Serialize)]
pub struct Row {
    pub name: &'static str,
    pub value: String,
    pub target: String,
    pub met: Option<bool>,
}

/// The `q` quantile (0..=1) of `samples`, nearest rank.
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// A row with the p50 and p99 of `samples` (seconds), shown in milliseconds.
pub fn percentiles(name: &'static str, samples: &[f64], target: Option<String>) -> Row {
    Row {
        name,
        value: format!(
            "p50 {:.1} ms, p99 {:.1} ms (n={})",
            percentile(samples, 0.5) * 1e3,
            percentile(samples, 0.99) * 1e3,
            samples.len()
        ),
        target: target.unwrap_or_else(|| "-".into()),
        met: None,
    }
}

/// Prints the rows as an aligned table.
pub fn print_table(rows: &[Row]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    println!(
        "\n{:width$}  {:52}  {:34}  met",
        "benchmark", "result", "target"
    );
    for row in rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        println!(
            "{:width$}  {:52}  {:34}  {met}",
            row.name, row.value, row.target
        );
    }
}
