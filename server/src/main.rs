//! The `sanjevani` binary: parses the command line and runs the server or an admin command.

fn main() {
    println!("sanjevani: the command line lands with the server issue");
}
