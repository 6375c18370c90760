fn main() {
    // The schema is embedded by sqlx::migrate!: rebuild when it changes.
    println!("cargo:rerun-if-changed=migrations");
}
