//! How `kubectl jit` prints: tables like kubectl's, JSON or YAML for scripts.

use serde::Serialize;

/// `-o`: a machine-readable format instead of the human one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Yaml,
}

/// Prints `value` as `format`.
pub fn print<T: Serialize>(value: &T, format: Format) -> Result<(), String> {
    let text = match format {
        Format::Json => serde_json::to_string_pretty(value).map_err(|e| e.to_string())? + "\n",
        Format::Yaml => serde_yaml_ng::to_string(value).map_err(|e| e.to_string())?,
    };
    print!("{text}");
    Ok(())
}

/// A table as kubectl prints one: upper-case headers, columns padded to their widest cell
/// plus three spaces, empty cells as `<none>` so that every row splits into its columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cell = |text: &str| {
        if text.is_empty() {
            "<none>".to_owned()
        } else {
            text.to_owned()
        }
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| cell(c)).collect())
        .collect();
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    (*c).to_owned()
                } else {
                    format!("{c:<width$}   ", width = widths[i])
                }
            })
            .collect::<String>()
    };
    let mut out = line(headers.to_vec()) + "\n";
    for row in &rows {
        out += &line(row.iter().map(String::as_str).collect());
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_never_leave_a_cell_empty() {
        let printed = table(
            &["NAME", "PHASE", "EXPIRES"],
            &[
                vec!["a".into(), "Granted".into(), "2030-01-01T00:00:00Z".into()],
                vec!["longer-name".into(), "Pending".into(), String::new()],
            ],
        );
        let lines: Vec<&str> = printed.lines().collect();
        assert_eq!(lines[0], "NAME          PHASE     EXPIRES");
        assert_eq!(lines[2], "longer-name   Pending   <none>");
        assert!(lines.iter().all(|l| l.split_whitespace().count() == 3));
    }
}
