//! Embeds the git commit the binary is built from as `OBO_SIDECAR_COMMIT` (for `--version` and
//! `obo_build_info`): the `OBO_SIDECAR_COMMIT` variable when set (a build from a tarball or a container
//! context without `.git`), else `git rev-parse --short=12 HEAD` with `-dirty` when the tree has changes, else
//! `unknown`. A build without git, or outside a repository, works all the same.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=OBO_SIDECAR_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(reference) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed=.git/{reference}");
    }
    let commit = std::env::var("OBO_SIDECAR_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=OBO_SIDECAR_COMMIT={commit}");
}

fn git_commit() -> Option<String> {
    let output = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = output(&["rev-parse", "--short=12", "HEAD"]).filter(|c| !c.is_empty())?;
    let dirty =
        output(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}
