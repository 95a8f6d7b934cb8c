//! `kvtier install-connector`: copies the connector's Python package out of the kvtier image
//! onto a volume the engine has on its `PYTHONPATH` (the operator's init container runs it:
//! the image has no shell and no `cp`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

#[derive(Args, Debug)]
pub(crate) struct InstallConnectorArgs {
    /// Folder to copy the package into (created when missing).
    dest: PathBuf,
    /// Where the package is (the image keeps it here).
    #[arg(long, default_value = "/opt/kvtier/python")]
    from: PathBuf,
}

/// Copies `from`'s tree into `to`, files and folders, keeping each file's permission bits;
/// returns how many files it copied.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut files = 0;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            files += copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            files += 1;
        }
    }
    Ok(files)
}

pub(crate) fn run(a: &InstallConnectorArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        a.from.join("kvtier").is_dir(),
        "{} holds no kvtier package (is this the kvtier image?)",
        a.from.display()
    );
    let n = copy_tree(&a.from, &a.dest)?;
    Ok(format!(
        "kvtier connector: {n} files copied from {} to {}\n",
        a.from.display(),
        a.dest.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_tree_is_copied_and_a_wrong_source_is_named() {
        let root = std::env::temp_dir().join(format!("kvtier-install-{}", std::process::id()));
        let from = root.join("python");
        std::fs::create_dir_all(from.join("kvtier/sub")).expect("dirs");
        std::fs::write(from.join("kvtier/__init__.py"), "x").expect("file");
        std::fs::write(from.join("kvtier/sub/_native.so"), "y").expect("file");
        std::fs::create_dir_all(from.join("kvtier-0.1.0.dist-info")).expect("dir");
        std::fs::write(from.join("kvtier-0.1.0.dist-info/RECORD"), "z").expect("file");
        let dest = root.join("install");
        let a = InstallConnectorArgs { dest: dest.clone(), from: from.clone() };
        assert!(run(&a).expect("copied").contains("3 files"));
        assert_eq!(std::fs::read_to_string(dest.join("kvtier/sub/_native.so")).expect("read"), "y");
        let wrong = InstallConnectorArgs { dest, from: root.join("nothing") };
        assert!(run(&wrong).expect_err("refused").to_string().contains("no kvtier package"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
