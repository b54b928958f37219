//! Picks the ```rust blocks out of a Markdown file and makes each the doc of a module, for the
//! doc tests in lib.rs. Shared with build.rs (which includes this file by path), so it uses
//! nothing but std.

/// Every block whose fence opens with ```rust (```rust,no_run too), fences included, with the
/// 1-based line of its opening fence. Other blocks (```sh, ```toml, plain output) are left
/// out: rustdoc would take an unlabelled one for Rust.
pub(crate) fn rust_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        let fence = line.trim_start();
        if open.is_none() && fence.starts_with("```rust") {
            open = Some((n + 1, String::new()));
        }
        if let Some((_, text)) = open.as_mut() {
            text.push_str(line);
            text.push('\n');
            if fence == "```" {
                blocks.extend(open.take());
            }
        }
    }
    blocks
}

/// Rust source with one empty module per block, the block as its doc, named for the block's
/// line (`readme_line_135`), so a failing doc test says which snippet it is.
pub(crate) fn doc_modules(blocks: &[(usize, String)]) -> String {
    blocks
        .iter()
        .map(|(line, text)| format!("#[doc = {text:?}]\npub mod readme_line_{line} {{}}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_rust_blocks_only_with_the_line_they_start_on() {
        let md = "# T\n\n```sh\nls\n```\n\n```rust,no_run\nlet a = \"1\";\n```\n\n```\nout\n```\n\
                  text\n  ```rust\n  b();\n  ```\n";
        let blocks = rust_blocks(md);
        assert_eq!(
            blocks,
            [
                (7, "```rust,no_run\nlet a = \"1\";\n```\n".to_string()),
                (15, "  ```rust\n  b();\n  ```\n".to_string()),
            ]
        );
        assert_eq!(
            doc_modules(&blocks[..1]),
            "#[doc = \"```rust,no_run\\nlet a = \\\"1\\\";\\n```\\n\"]\npub mod readme_line_7 {}\n"
        );
    }

    #[test]
    fn every_rust_block_of_the_readme_is_picked() {
        let readme = include_str!("../../README.md");
        let blocks = rust_blocks(readme);
        assert!(!blocks.is_empty(), "README.md: no ```rust block");
        assert_eq!(blocks.len(), readme.matches("```rust").count());
    }
}
