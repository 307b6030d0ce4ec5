//! Embeds the web client (`web/static/`, committed) into the binary, so the daemon serves it
//! with no files to install and no build step for the user.

use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/static");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    let mut table = String::from(
        "/// (URL path, contents) of every file under `web/static/`.\n\
         pub static ASSETS: &[(&str, &[u8])] = &[\n",
    );
    for file in &files {
        let Ok(relative) = file.strip_prefix(&root) else {
            continue;
        };
        let url = format!("/{}", relative.to_string_lossy().replace('\\', "/"));
        let absolute = file.canonicalize().unwrap_or_else(|_| file.clone());
        table.push_str(&format!(
            "    ({url:?}, include_bytes!({:?})),\n",
            absolute.to_string_lossy()
        ));
    }
    table.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    if let Err(e) = std::fs::write(out.join("web_assets.rs"), table) {
        panic!("cannot write the web asset table: {e}");
    }
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.is_file() {
            files.push(path);
        }
    }
}
