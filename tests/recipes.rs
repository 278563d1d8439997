//! Every recipe in passes/ parses and names only passes lcc knows.

use lcc::passes::Pipeline;
use std::path::Path;

#[test]
fn every_recipe_builds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("passes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let p = Pipeline::from_yaml(&path).unwrap_or_else(|e| panic!("{e}"));
            p.build()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 3, "expected the LongLoRA recipes in passes/");
}
