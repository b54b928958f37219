//! Writes `$OUT_DIR/readme_snippets.rs`: a module per ```rust block of the workspace README,
//! the block as its doc, which src/lib.rs includes so that `cargo test` compiles every snippet.

#[path = "src/readme.rs"]
mod readme;

fn main() {
    let readme = std::path::Path::new("../README.md");
    println!("cargo::rerun-if-changed={}", readme.display());
    let text = std::fs::read_to_string(readme).expect("README.md next to examples/");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let source = readme::doc_modules(&readme::rust_blocks(&text));
    std::fs::write(out.join("readme_snippets.rs"), source).expect("write readme_snippets.rs");
}
