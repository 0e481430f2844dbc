//! `weftctl check DIR...`: the controller's reading of manifest directories, without a
//! controller: every problem with its file, line, object, field and reason.

use std::path::PathBuf;

use controller::translate::{translate, Settings};

/// Prints the problems found in `dirs` (to stdout) and a summary (to stderr); returns
/// how many there are.
pub fn check(dirs: &[PathBuf], trust_domain: &str) -> anyhow::Result<usize> {
    let snapshot = controller::manifests::load(dirs)?;
    let settings = Settings {
        trust_domain: trust_domain.to_owned(),
        trust_bundle: Vec::new(),
    };
    let translation = translate(&snapshot.objects, &settings);
    let mut problems = snapshot.problems;
    problems.extend(translation.problems);
    for p in &problems {
        println!("{p}");
    }
    eprintln!(
        "{} objects read, {} resources in the model, {} problem{}",
        snapshot.objects.len(),
        translation.entries.len(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    Ok(problems.len())
}
